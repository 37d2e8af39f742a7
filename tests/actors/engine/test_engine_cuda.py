"""The engine on the GPU: memory planning, CUDA-graph decode steps against eager ones, and greedy generation
against transformers on the dequantized weights."""

import copy

import pytest
import torch

from shardgen.actors.engine.build import build_engine

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.engine import Engine
from shardgen.actors.model.loader import load_model
from shardgen.actors.engine.sequence import Request, SamplingParams
from tests.helpers import require_gpu_kernels
from tests.actors.model.test_model_cuda import SHAPE
from tests.helpers import hf_greedy, int4_checkpoint, prefix_agreement

pytestmark = pytest.mark.gpu
require_gpu_kernels()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return int4_checkpoint("llama", tmp_path_factory.mktemp("engine-gpu"), group_size=128, dtype=torch.bfloat16,
                           max_position_embeddings=512, **SHAPE)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (int(k),), generator=g).tolist() for k in torch.randint(3, 60, (n,), generator=g)]


def engine(path, **config) -> Engine:
    cfg = EngineConfig(**{"max_num_seqs": 32, "max_num_batched_tokens": 512, **config})
    # fbgemm's preshuffled GEMM rounds the same at any batch size; humming's (auto's int4-dual at decode) does not,
    # which put greedy graphs-vs-eager agreement at 0.76 on a random tiny model (H100, 2026-12-06): this tests the
    # engine, the layouts' accuracy is tested in tests/actors/int4/test_int4_cuda.py
    return build_engine(load_model(path, device="cuda", int4_layout="int4-preshuffled"), cfg)


def test_kv_cache_is_sized_from_memory_left_after_weights_and_measured_activations(checkpoint):
    _, path = checkpoint
    e = engine(path, gpu_memory_utilization=0.5)
    r = e.runner
    total = torch.cuda.get_device_properties(0).total_memory
    kv = r.kv_cache_bytes
    print(f"activation peak {r.activation_peak / 2**20:.1f} MiB, KV cache {kv / 2**30:.2f} GiB "
          f"({r.num_blocks} blocks), allocated {torch.cuda.memory_allocated() / 2**30:.2f} of {total / 2**30:.1f} GiB")
    assert r.activation_peak > 0
    assert torch.cuda.memory_allocated() + r.activation_peak <= 0.5 * total
    assert kv > 0.3 * total  # nearly everything under the limit went to the cache (the model is tiny)


def test_a_budget_that_cannot_fit_says_so_with_numbers(checkpoint):
    _, path = checkpoint
    with pytest.raises(ValueError, match=r"GiB x `gpu_memory_utilization` 0.001 .* GiB are in use"):
        engine(path, gpu_memory_utilization=0.001)


def test_cuda_graph_decode_steps_match_eager_ones(checkpoint):
    """One runner, the same decode step replayed through its graph and run eagerly: the same logits up to bf16
    GEMM tiling (a graph's batch is padded to its bucket)."""
    _, path = checkpoint
    e = engine(path)
    assert e.runner.graphs is not None
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=1)) for i, p in enumerate(prompts(13))]
    seqs = []
    # Prefill 13 sequences, then build one decode step for them by hand.
    from shardgen.actors.engine.sequence import Sequence

    for r in reqs:
        s = Sequence(r)
        e.scheduler.add(s)
        seqs.append(s)
    batch, _ = e.scheduler.schedule()
    logits = e.runner.execute(e.runner.prepare(batch))
    for s, n, t in zip(batch.seqs, batch.num_tokens, logits.argmax(-1).tolist()):
        s.num_computed += n
        s.tokens.append(t)
    decode, _ = e.scheduler.schedule()
    assert all(n == 1 for n in decode.num_tokens)
    step = e.runner.prepare(decode)
    graphed = e.runner.execute(step)
    graphs, e.runner.graphs = e.runner.graphs, None
    eager = e.runner.execute(step)
    e.runner.graphs = graphs
    err = ((graphed - eager).norm() / eager.norm()).item()
    print(f"decode of 13 sequences (bucket 16): graph vs eager logits rel err {err:.2e}")
    assert err < 1e-2 and (graphed.argmax(-1) == eager.argmax(-1)).float().mean() >= 12 / 13


def test_engine_greedy_on_the_gpu_agrees_with_transformers(checkpoint):
    """Free-running greedy, 24 prompts: shardgen (graphs) vs float32 transformers, next to bf16 transformers vs
    float32 transformers (bf16 near-ties let both drift); and graphs vs eager."""
    reference, path = checkpoint
    ps = prompts(24, seed=1)
    new = 16
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    reqs = [Request(str(i), p, params) for i, p in enumerate(ps)]
    graphed = [c.token_ids for c in engine(path).generate(reqs)]
    eager = [c.token_ids for c in engine(path, cuda_graphs=False).generate(reqs)]
    with torch.no_grad():
        fp32 = [hf_greedy(reference, p, new) for p in ps]
        bf16 = copy.deepcopy(reference).to("cuda", torch.bfloat16)
        theirs = [hf_greedy(bf16, p, new) for p in ps]

    ours, hf, ge = prefix_agreement(graphed, fp32), prefix_agreement(theirs, fp32), prefix_agreement(graphed, eager)
    print(f"greedy prefix agreement with float32 transformers: shardgen graphs {ours:.3f}, transformers bf16 {hf:.3f}; "
          f"graphs vs eager {ge:.3f}")
    assert ours >= hf - 0.1 and ge >= 0.9


def test_logprobs_on_the_gpu_are_the_models_log_softmax_as_float32_transformers_computes_it(checkpoint):
    """Completion and prompt log-probabilities from decode steps under CUDA graphs, sampled at temperature 0.7 with
    top-k 5, against float32 transformers' ``log_softmax`` on the dequantized weights. bf16 activations move a
    log-probability by a few 1e-2 (the CPU twin in test_engine.py, in float32, holds 1e-4); taking them after
    temperature would move it by tenths."""
    reference, path = checkpoint
    ps = prompts(6, seed=2)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=5, seed=3, logprobs=4, prompt_logprobs=True,
                            ignore_eos=True)
    done = engine(path).generate([Request(str(i), p, params) for i, p in enumerate(ps)])
    errors, prompt_errors, top_same = [], [], []
    for prompt, got in zip(ps, done):
        with torch.no_grad():
            ids = torch.tensor([prompt + got.token_ids], device=reference.device)
            ref = torch.log_softmax(reference(ids).logits[0].float(), dim=-1).cpu()
        for j, token in enumerate(got.token_ids):
            step = ref[len(prompt) + j - 1]
            errors.append(abs(got.logprobs[j] - float(step[token])))
            top = torch.topk(step, 4)
            assert len(got.top_logprobs[j]) == 4
            top_same.append(got.top_logprobs[j][0][0] == int(top.indices[0]))
            errors += [abs(v - float(step[t])) for t, v in got.top_logprobs[j]]
        prompt_errors += [abs(a - float(ref[j - 1, prompt[j]])) for j, a in enumerate(got.prompt_logprobs) if j]
    worst, mean = max(errors + prompt_errors), sum(errors + prompt_errors) / len(errors + prompt_errors)
    print(f"logprobs vs float32 transformers: max abs diff {worst:.3e}, mean {mean:.3e} over "
          f"{len(errors) + len(prompt_errors)} values; top-1 agrees at {sum(top_same)}/{len(top_same)} steps")
    assert worst <= 0.1 and mean <= 0.02
    assert sum(top_same) >= 0.9 * len(top_same)


def test_a_real_out_of_memory_in_a_step_fails_the_request_naming_the_settings_to_lower(checkpoint):
    """The GPU twin of test_engine.py's simulated OOM (Ray's ray.data.llm hangs on one, its issue #59986): the
    memory the step needs is taken by a ballast tensor, the step's allocation fails inside torch, and the request
    fails at once with the settings to lower."""
    import time

    _, path = checkpoint
    e = engine(path, gpu_memory_utilization=0.5, cuda_graphs=False)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the activations' cached blocks go back, so the step must allocate anew
    ballast = []  # every block the allocator can still get: 1 GiB at a time, then 2 MiB (its granularity)
    for size in (2**30, 2**21):
        while True:
            try:
                ballast.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break
    try:
        started = time.monotonic()
        prompt = torch.randint(0, 2048, (500,), generator=torch.Generator().manual_seed(3)).tolist()
        with pytest.raises(RuntimeError, match=r"out of GPU memory in an engine step \(.*\); lower "
                                               r"`max_num_batched_tokens` \(now 512\)"):
            e.generate([Request("big", prompt, SamplingParams(max_new_tokens=4))])
        assert time.monotonic() - started < 60
    finally:
        del ballast
        torch.cuda.empty_cache()
