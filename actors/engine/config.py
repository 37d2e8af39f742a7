"""The engine's limits, and the one source of their defaults: the CLI, ``shardgen bench`` and the scheduler read
them here."""

from __future__ import annotations

from dataclasses import dataclass

# KV cache element types: the model's dtype, or float8 e4m3 with a scale per token and head (kernels/kv_cache.py).
KV_CACHE_DTYPES = ("auto", "fp8")
# How the scheduler admits sequences (actors/engine/scheduler.py).
ADMISSIONS = ("greedy", "projected")


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one replica's engine, and the one source of their defaults (the CLI, the bench and the scheduler
    read them here). ``kv_cache_memory`` None: sized from what the device has left (runner)."""

    # What the GPU benchmarks run with: enough sequences to fill an H100's tensor cores in decode, and a step budget
    # that keeps a prompt chunk's GEMMs at full speed.
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    cuda_graphs: bool = True
    # Launch the next decode step before the current one's tokens reach the host (engine.py; one rank only).
    overlap_decode: bool = True
    # GPU attention in one launch per kind of sequence (decode rows; chunks over cached tokens; sequences with
    # nothing cached, through FlashAttention); off: one paged-kernel launch for the whole step (attention.py).
    attention_by_parts: bool = True
    # Long uncached sequences through cuDNN's fused attention on Hopper (prefill_attention.py); off: FlashAttention.
    # Off by default: FlashAttention was faster on prefill-heavy on both GPUs measured (benchmarks/README.md).
    cudnn_prompts: bool = False
    kv_cache_dtype: str = "auto"
    # Admit sequences by what their next chunk needs (greedy, preempting when the cache runs out) or only while the
    # cache can hold every running sequence at its length limit (projected; actors/engine/scheduler.py).
    admission: str = "greedy"
    # Share the KV blocks of a common prompt prefix between sequences (actors/engine/blocks.py).
    prefix_caching: bool = True
    # A replica whose engine has work but finishes no step for this long is stuck (a rank hung in a collective, a
    # wedged GPU) and is rebuilt: far above any step's time (seconds), so only a hang reaches it.
    step_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSIONS)}, got {self.admission!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"`kv_cache_dtype` must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"`max_num_seqs` must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"`max_model_len` must be >= 2, got {self.max_model_len}")
        if self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("the token budget per step and the block size must be >= 1")
        if not self.step_timeout_s > 0:
            raise ValueError(f"`step_timeout_s` must be > 0, got {self.step_timeout_s}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"`gpu_memory_utilization` must be in (0, 1], got {self.gpu_memory_utilization}")
