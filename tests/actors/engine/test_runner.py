"""The runner's step inputs: how a step's sequences split by kind for attention."""

from shardgen.actors.model.attention import StepParts
from shardgen.actors.engine.sequence import Request, SamplingParams
from tests.helpers import make_engine, random_prompts


def test_each_step_names_its_decode_rows_and_its_sequences_with_nothing_cached(model):
    _, loaded = model
    engine = make_engine(loaded, max_num_seqs=4, max_num_batched_tokens=64)
    seen = []
    prepare = engine.runner.prepare

    def spy(batch, input_ids=None):
        step = prepare(batch, input_ids)
        cached = [s.num_computed for s in batch.seqs]
        assert step.parts == StepParts.of(batch.num_tokens, cached)
        seen.append((cached, list(batch.num_tokens), step.parts))
        return step

    engine.runner.prepare = spy
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.generate([Request(str(i), p, params) for i, p in enumerate(random_prompts([20, 30, 100]))])
    # Two whole prompts and the first chunk of the third, nothing cached; then decode rows and the chunk that
    # continues over the third's cached tokens; then decode rows only.
    assert seen[0] == ([0, 0, 0], [20, 30, 14], StepParts(0, 0, 0, 0, (20, 30, 14)))
    assert seen[1] == ([20, 30, 14], [1, 1, 62], StepParts(2, 3, 64, 62, ()))
    cached, _, parts = seen[-1]
    assert parts == StepParts(len(cached), len(cached), len(cached), 0, ())
