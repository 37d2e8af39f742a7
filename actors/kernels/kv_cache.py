"""The paged KV cache of one rank: its layout per layer, its size in bytes, and its fp8 form.

Each layer holds keys and values as (blocks, block_size, Hkv, D). With ``kv_cache_dtype="auto"`` they are in
the model's dtype. With ``"fp8"`` they are float8 e4m3 with one float32 scale per token and KV head
(``k_scale``, ``v_scale``: (blocks, block_size, Hkv)). Each head's 128 values share the scale of their own
largest magnitude, so no token's range is clipped by a neighbour's and no calibration is needed. That costs 4
bytes per 128 stored; the cache holds 1.94x the tokens of bf16. The attention kernels widen fp8 tiles to float16
and fold the scales into the scores (keys) and the probabilities (values): q . (s k) = s (q . k),
sum_n p_n (s_n v_n) = (p s) . v. Decode reads half the bytes but, widening included, runs at about the bf16
cache's speed (benchmarks/README.md): the gain is capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn


@dataclass
class LayerCache:
    """One layer's keys and values; scales only for an fp8 cache."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def nbytes(self) -> int:
        scales = self.k_scale.nbytes + self.v_scale.nbytes if self.quantized else 0
        return self.k.nbytes + self.v.nbytes + scales

    def gather(self, block_tables: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every block of each table row, in ``dtype``: (B, blocks * block_size, Hkv, D)."""
        keys, values = self.k[block_tables].flatten(1, 2), self.v[block_tables].flatten(1, 2)
        if not self.quantized:
            return keys, values
        k_scale = self.k_scale[block_tables].flatten(1, 2)[..., None]
        v_scale = self.v_scale[block_tables].flatten(1, 2)[..., None]
        return (keys.float() * k_scale).to(dtype), (values.float() * v_scale).to(dtype)


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    assert kv_cache_dtype in ("auto", "fp8"), kv_cache_dtype
    return FP8 if kv_cache_dtype == "fp8" else model_dtype


def block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int, model_dtype: torch.dtype,
                kv_cache_dtype: str) -> int:
    """Bytes of one block of every layer's keys and values (and their scales) on one rank."""
    per_head = head_dim * storage_dtype(kv_cache_dtype, model_dtype).itemsize
    if kv_cache_dtype == "fp8":
        per_head += 4  # the float32 scale
    return 2 * num_layers * block_size * kv_heads * per_head


def allocate(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
             model_dtype: torch.dtype, kv_cache_dtype: str, device: torch.device) -> list[LayerCache]:
    dtype = storage_dtype(kv_cache_dtype, model_dtype)
    shape = (num_blocks, block_size, kv_heads, head_dim)

    def layer() -> LayerCache:
        k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        if kv_cache_dtype != "fp8":
            return LayerCache(k, v)
        ones = lambda: torch.ones(shape[:-1], dtype=torch.float32, device=device)  # noqa: E731
        return LayerCache(k, v, ones(), ones())

    return [layer() for _ in range(num_layers)]


def check_supported(kv_cache_dtype: str, device: torch.device) -> None:
    """fp8 needs a GPU whose Triton converts e4m3 in hardware (compute capability 8.9+: Ada, Hopper and later)."""
    if kv_cache_dtype != "fp8" or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"`kv_cache_dtype` fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use `kv_cache_dtype` auto")


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (tokens, Hkv, D) -> (fp8 values, float32 scale per token and head); x ~= values * scale."""
    amax = x.float().abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale
