"""A row's sampling parameters as one struct column, the way tokenize writes them and generate reads them."""

import pyarrow as pa

from shardgen.actors.engine.sequence import SEED_MODULUS, SamplingParams
from shardgen.pipeline.columns import PARAMS, params_array, params_list


def test_sampling_parameters_come_back_as_they_went_in_and_a_failed_row_has_none():
    rows = [SamplingParams(max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=("x", "\n\n"),
                           stop_token_ids=(2, 5), ignore_eos=True, logprobs=4, prompt_logprobs=True), None, SamplingParams()]
    column = params_array(rows)
    assert column.type == PARAMS and column.null_count == 1
    assert params_list(column) == rows
    assert params_list(pa.chunked_array([column])) == rows


def test_a_seed_beyond_int64_is_kept_as_its_remainder_which_samples_the_same():
    (p,) = params_list(params_array([SamplingParams(seed=2**64 + 5)]))
    assert p.seed == (2**64 + 5) % SEED_MODULUS
