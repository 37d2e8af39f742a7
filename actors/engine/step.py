"""One engine step's inputs, and how rank 0 sends them to the other ranks of its tensor-parallel group.

Rank 0 schedules; every other rank runs the same forward on what ``send`` gives it. A step travels as two tensor
broadcasts: a fixed header of HEADER int64 numbers (what the step is, and its sizes and host-side maxima), then one
int64 buffer holding every tensor of the step end to end. Under NCCL both are GPU tensors: a follower's step tensors
arrive where its forward reads them, and only the header comes back to its host (one small copy a step, which the
follower needs anyway to size the step). A pickled object (``broadcast_object_list``) cost a host round trip of the
whole step on every rank, every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from shardgen.actors.model.attention import StepParts

HEADER = 16
STEP, NOOP, STOP = 0, 1, 2  # what a header announces: a step to run; nothing (a heartbeat); the end
# The header's slots (the rest are zero)
_KIND, _TOKENS, _SEQS, _WIDTH, _MAX_Q, _MAX_CTX, _LOGITS, _HAS_PARTS, _DECODE, _UNCACHED, _UNCACHED_ROW, _MIDDLE_MAX_Q, \
    _UNCACHED_LENS, _PROMPT_ROWS = range(14)


@dataclass
class StepInput:
    """Everything a rank needs to run one forward pass: CPU tensors on rank 0; on a follower the tensors are where
    they arrived (``receive``: the GPU under NCCL) and the plain fields on the host."""

    input_ids: torch.Tensor  # int64 (tokens,)
    positions: torch.Tensor  # int64 (tokens,)
    cu_seqlens_q: torch.Tensor  # int32 (seqs + 1,)
    context_lens: torch.Tensor  # int32 (seqs,)
    slot_mapping: torch.Tensor  # int64 (tokens,)
    block_tables: torch.Tensor  # int32 (seqs, width)
    max_q_len: int
    max_context_len: int
    logits_indices: torch.Tensor  # rows of the flattened tokens whose next token is sampled
    parts: StepParts | None = None  # the sequences by kind, for attention (None: one paged launch)
    # (sequence, first position, count) of prompt positions whose logits follow the sampled rows' in the output:
    # sequences that asked for prompt_logprobs (position p's logits give prompt token p + 1 its log-probability).
    prompt_rows: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def prefill(cls, lengths: list[int], block_size: int) -> "StepInput":
        """Whole prompts of the given lengths in consecutive cache blocks (memory profiling, warm-up)."""
        pos, slots, tables, first = [], [], [], 0
        for n in lengths:
            blocks = -(-n // block_size)
            tables.append(list(range(first, first + blocks)))
            pos.extend(range(n))
            slots.extend(range(first * block_size, first * block_size + n))
            first += blocks
        width = max(len(t) for t in tables)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        return cls(torch.zeros(len(pos), dtype=torch.int64), torch.tensor(pos), torch.tensor(cu, dtype=torch.int32),
                   torch.tensor(lengths, dtype=torch.int32), torch.tensor(slots),
                   torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                   max(lengths), max(lengths), torch.tensor(cu[1:] - 1), StepParts.of(lengths, [0] * len(lengths)))


def pack(step: StepInput) -> tuple[torch.Tensor, torch.Tensor]:
    """The header and the buffer that carry ``step``; the buffer's tail holds what followers need on the host
    (the last part's prompt lengths, the prompt-logprob rows), empty for a decode step."""
    seqs, width = step.block_tables.shape
    parts = step.parts
    header = [STEP, step.input_ids.numel(), seqs, width, step.max_q_len, step.max_context_len,
              step.logits_indices.numel(), parts is not None]
    if parts is not None:
        header += [parts.decode, parts.uncached, parts.uncached_row, parts.middle_max_q, len(parts.uncached_lens)]
    else:
        header += [0] * 5
    header += [len(step.prompt_rows)]
    host = list(parts.uncached_lens if parts is not None else ()) + [x for row in step.prompt_rows for x in row]
    tensors = (step.input_ids, step.positions, step.cu_seqlens_q, step.context_lens, step.slot_mapping,
               step.block_tables, step.logits_indices, torch.tensor(host, dtype=torch.int64))
    buffer = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    return torch.tensor(header + [0] * (HEADER - len(header)), dtype=torch.int64), buffer


def unpack(header: list[int], buffer: torch.Tensor) -> StepInput:
    """The step that ``pack`` made ``header`` and ``buffer`` of; its tensors are views or copies on the buffer's
    device."""
    assert header[_KIND] == STEP and len(header) == HEADER, header[:2]
    sizes = _sizes(header)
    assert buffer.numel() == sum(sizes), (buffer.numel(), sizes)
    ids, positions, cu, ctx, slots, tables, logits_idx, host = torch.split(buffer, sizes)
    host = host.tolist() if host.numel() else []  # a device-to-host copy only when the step has such rows
    n_lens = header[_UNCACHED_LENS]
    parts = StepParts(header[_DECODE], header[_UNCACHED], header[_UNCACHED_ROW], header[_MIDDLE_MAX_Q],
                      tuple(host[:n_lens])) if header[_HAS_PARTS] else None
    rows = host[n_lens:]
    prompt_rows = tuple(tuple(rows[i:i + 3]) for i in range(0, len(rows), 3))
    assert len(prompt_rows) == header[_PROMPT_ROWS], (len(prompt_rows), header[_PROMPT_ROWS])
    int32 = torch.int32
    tables = tables.view(header[_SEQS], header[_WIDTH]).to(int32)
    return StepInput(ids, positions, cu.to(int32), ctx.to(int32), slots, tables, header[_MAX_Q], header[_MAX_CTX],
                     logits_idx, parts, prompt_rows)


def _sizes(header: list[int]) -> list[int]:
    """The buffer's parts, in ``pack``'s order: input_ids, positions, cu_seqlens_q, context_lens, slot_mapping,
    block_tables, logits_indices, and the host tail (the last part's prompt lengths, then the prompt rows)."""
    tokens, seqs = header[_TOKENS], header[_SEQS]
    return [tokens, tokens, seqs + 1, seqs, tokens, seqs * header[_WIDTH], header[_LOGITS],
            header[_UNCACHED_LENS] + 3 * header[_PROMPT_ROWS]]


def send(step: StepInput, device: torch.device) -> None:
    """Rank 0: broadcast ``step`` to the group's other ranks, as tensors on ``device`` (the GPU under NCCL)."""
    header, buffer = pack(step)
    dist.broadcast(header.to(device, non_blocking=True), src=0)
    dist.broadcast(buffer.to(device, non_blocking=True), src=0)


def send_signal(kind: int, device: torch.device) -> None:
    """Rank 0: a header alone, NOOP (keeps idle followers' collective from timing out) or STOP."""
    assert kind in (NOOP, STOP), kind
    header = torch.zeros(HEADER, dtype=torch.int64)
    header[_KIND] = kind
    dist.broadcast(header.to(device), src=0)


def receive(device: torch.device) -> StepInput | int:
    """A follower: the next step from rank 0, or NOOP or STOP."""
    header = torch.empty(HEADER, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    values = header.tolist()
    if values[_KIND] != STEP:
        return values[_KIND]
    buffer = torch.empty(sum(_sizes(values)), dtype=torch.int64, device=device)
    dist.broadcast(buffer, src=0)
    return unpack(values, buffer)
