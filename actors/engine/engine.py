"""The generation engine of one replica (runs on rank 0).

Requests may be added from any thread at any time (several Ray Data batches in
flight keep it full); ``step`` schedules one continuous-batching step, runs the
model on every rank, samples, and finishes sequences on EOS, stop tokens, stop
strings, ``max_new_tokens`` or ``max_model_len``.

Decode steps overlap with the host: when a step is pure greedy decode and
nothing waits to be admitted, the next step is planned and launched with the
current step's tokens still on the device, before they are copied to the host,
so the GPU never idles while the host appends tokens, checks stops and
prepares inputs. A sequence that stops on a token was given one more step in
flight; its row of that step is dropped. Its cache blocks go back to the pool
at once: whatever reuses them is launched after that step, on the same stream.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.runner import ModelRunner
from shardgen.actors.engine import stops
from shardgen.actors.engine.grammar import Constraints, Grammars, constraint_of
from shardgen.actors.engine.penalties import Penalties
from shardgen.actors.engine.sampler import PendingTokens, mask_early_stops, sample, token_logprobs
from shardgen.actors.engine.scheduler import ScheduledBatch, Scheduler
from shardgen.actors.engine.sequence import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    Request,
    SampleGroup,
    Sequence,
    Status,
    sample_params,
)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    running_per_step: list[int] = field(default_factory=list)
    steps_ahead: int = 0  # decode steps launched before the previous step's tokens reached the host


class Engine:
    def __init__(self, runner: ModelRunner, config: EngineConfig, max_model_len: int, eos_token_ids: set[int],
                 detokenize: Callable[[list[int]], str] | None = None,
                 make_grammars: Callable[[], Grammars] | None = None) -> None:
        self.runner = runner
        self.config = config
        self.scheduler = Scheduler(config, runner.num_blocks, max_model_len)
        self.eos_token_ids = set(eos_token_ids)
        self.detokenize = detokenize
        self.constraints = Constraints(make_grammars)
        self.penalties = Penalties(runner.device)
        self.stats = EngineStats()
        self._inbox: list[tuple[Request, Future]] = []
        self._groups: dict[int, SampleGroup] = {}  # id(sequence) -> its request's samples
        self._lock = threading.Condition()
        self._closed = False
        self._ahead: tuple[ScheduledBatch, PendingTokens] | None = None  # a decode step launched, not yet read
        self._progress_at = time.monotonic()  # when the last step ended, or the engine last had nothing to do

    # -- intake (any thread)

    def add(self, requests: list[Request]) -> list[Future]:
        """Queue requests; each future resolves to the request's completions, one per sample (``params.n``)."""
        futures = [Future() for _ in requests]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._inbox.extend(zip(requests, futures))
            self._lock.notify()
        return futures

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Add requests and step until they are done (single-threaded use: tests, benchmarks); their completions in
        order, a request's samples one after another."""
        futures = self.add(requests)
        while not all(f.done() for f in futures):
            try:
                self.step()
            except torch.OutOfMemoryError as e:
                raise RuntimeError(self.failure(e)) from e
        return [c for f in futures for c in f.result()]

    def failure(self, e: BaseException) -> str:
        """What a step's exception tells the user; out of device memory names the settings that size a step."""
        if isinstance(e, torch.OutOfMemoryError):
            c = self.config
            return (f"out of GPU memory in an engine step ({str(e).splitlines()[0][:160]}); lower "
                    f"`max_num_batched_tokens` (now {c.max_num_batched_tokens}) or `max_num_seqs` (now "
                    f"{c.max_num_seqs}), or `gpu_memory_utilization` (now {c.gpu_memory_utilization}) to leave the "
                    f"steps more room")
        return f"{type(e).__name__}: {e}"

    # -- the loop (one thread)

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work() or self._ahead is not None

    def stalled_s(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle): a step stuck in a collective or
        on a wedged device shows here, while the actor still answers pings (any thread)."""
        if not self.has_work():
            self._progress_at = time.monotonic()
            return 0.0
        return time.monotonic() - self._progress_at

    def step(self) -> int:
        """One scheduling step; returns how many tokens it ran."""
        try:
            return self._step()
        finally:
            self._progress_at = time.monotonic()

    def _step(self) -> int:
        with self._lock:
            for request, future in self._inbox:
                seq = Sequence(request)
                self._groups[id(seq)] = SampleGroup(future, request.params.n)
                problem = self.constraints.problem(request.params)
                if problem is not None:
                    seq.status, seq.finish_reason, seq.error = Status.FINISHED, FINISH_ERROR, problem
                    self._resolve(seq)
                    continue
                self.scheduler.add(seq)
            self._inbox.clear()
        if self._ahead is not None:
            return self._finish_ahead()
        batch, refused = self.scheduler.schedule()
        for seq in refused:
            self._resolve(seq)
        if not batch.seqs:
            return 0
        step = self.runner.prepare(batch)
        logits = self.runner.execute(step)
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        if step.prompt_rows:
            self._prompt_logprobs(batch, step.prompt_rows, logits[len(sampled):])
            logits = logits[: len(sampled)]
        penalised = self.penalties.apply(logits, sampled)  # logprobs stay the model's own: of ``logits``
        if self._overlappable(batch, sampled):
            return self._finish_decode(batch, PendingTokens(penalised), list(range(len(batch.seqs))))
        adjusted = mask_early_stops(self.constraints.masked(penalised, sampled), sampled, self.eos_token_ids)
        tokens = sample(adjusted, [s.params for s in sampled], [s.num_output for s in sampled])
        self._advance(batch)
        for i, (seq, token) in enumerate(zip(sampled, tokens)):
            if seq.params.logprobs:
                lp, top = token_logprobs(logits[i], token, seq.params.logprobs)
                seq.logprobs.append(lp)
                seq.top_logprobs.append(top)
            self._append(seq, token)
        return batch.total_tokens

    def _prompt_logprobs(self, batch: ScheduledBatch, rows: tuple[tuple[int, int, int], ...], logits: torch.Tensor) -> None:
        """Each listed prompt position's log-probability of the next prompt token. A position already recorded (a
        preempted sequence computes its prompt again) is not recorded twice."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        offset = 0
        for i, first, count in rows:
            seq = batch.seqs[i]
            if first == len(seq.prompt_logprobs):
                nxt = torch.tensor(seq.tokens[first + 1 : first + 1 + count], device=lp.device)
                seq.prompt_logprobs.extend(lp[offset : offset + count].gather(1, nxt[:, None])[:, 0].tolist())
            offset += count

    def _advance(self, batch: ScheduledBatch) -> None:
        """Count the batch's tokens as computed (into the KV cache)."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.num_computed < seq.num_prompt:
                self.stats.prompt_tokens += min(n, seq.num_prompt - seq.num_computed)
            seq.num_computed += n
            self.scheduler.blocks.register(seq)
            if seq.sample_index == 0 and seq.num_computed >= seq.num_prompt and seq.params.n > 1:
                group = self._groups[id(seq)]
                if not group.forked:
                    self._fork_samples(seq, group)
        self.stats.steps += 1
        self.stats.running_per_step.append(len(batch.seqs))

    def _fork_samples(self, first: Sequence, group: SampleGroup) -> None:
        """Make a request's samples 1..n-1 now that sample 0's prompt is in the cache: each starts with its full
        blocks and computes only the prompt's last, partial block; they wait at the head of the queue."""
        group.forked = True
        shared = first.prompt_logprobs if first.params.prompt_logprobs else None
        samples = []
        for i in range(1, group.n):
            request = Request(first.request.request_id, first.request.prompt_token_ids,
                              sample_params(first.params, i))
            seq = Sequence(request, sample_index=i,
                           shared_prompt_logprobs=list(shared) if shared is not None else None)
            seq.num_computed = self.scheduler.blocks.fork(seq, first)
            self._groups[id(seq)] = group
            samples.append(seq)
        self.scheduler.add_first(samples)

    def _overlappable(self, batch: ScheduledBatch, sampled: list[Sequence]) -> bool:
        """A pure greedy decode step, on a runner that can launch the next one ahead (rows that report logprobs or
        follow a grammar read their logits on the host: not launched ahead; penalties are applied on the device)."""
        return (self.runner.can_overlap and len(sampled) == len(batch.seqs) and batch.total_tokens == len(batch.seqs)
                and all(s.params.temperature == 0 and not s.params.logprobs and not s.params.prompt_logprobs
                        and constraint_of(s.params) is None
                        and s.num_output >= s.params.min_tokens for s in sampled))

    def _finish_decode(self, batch: ScheduledBatch, pending: PendingTokens, rows: list[int]) -> int:
        """Plan and launch the next decode step on ``pending``'s device tokens, then read them and append them
        while the GPU runs it. ``rows[i]``: the row of ``pending`` that holds ``batch.seqs[i]``'s token."""
        self._advance(batch)
        self.penalties.count(batch.seqs, pending.tokens, rows)  # on the device: the step ahead's penalties see them
        limit = self.scheduler.max_model_len
        # Sequences this step finishes by length leave now; a stop token can only be seen once the tokens arrive.
        going_on = [i for i, s in enumerate(batch.seqs)
                    if s.num_output + 1 < s.params.max_new_tokens and len(s.tokens) + 1 < limit]
        with self._lock:
            quiet = not self._inbox
        # the step ahead's tokens are taken as they come (argmax): none of its rows may still need EOS masked
        plain = all(batch.seqs[i].num_output + 1 >= batch.seqs[i].params.min_tokens for i in going_on)
        ahead = (self.scheduler.plan_decode_ahead([batch.seqs[i] for i in going_on])
                 if quiet and going_on and plain else None)
        if ahead is not None:
            picked = [rows[i] for i in going_on]
            ids = pending.tokens
            if picked != list(range(ids.numel())):
                ids = ids[torch.tensor(picked).to(ids.device, non_blocking=True)]
            logits = self.runner.execute(self.runner.prepare(ahead, input_ids=ids))
            self._ahead = (ahead, PendingTokens(self.penalties.apply(logits, ahead.seqs)))
            self.stats.steps_ahead += 1
        tokens = pending.tolist()
        for seq, row in zip(batch.seqs, rows):
            self._append(seq, tokens[row])
        return batch.total_tokens

    def _finish_ahead(self) -> int:
        """Read the decode step launched ahead: rows of sequences that stopped meanwhile are dropped."""
        batch, pending = self._ahead
        self._ahead = None
        live = [i for i, s in enumerate(batch.seqs) if s.status is Status.RUNNING]
        if not live:
            return 0
        if len(live) < len(batch.seqs):
            batch = ScheduledBatch([batch.seqs[i] for i in live], [1] * len(live))
        return self._finish_decode(batch, pending, live)

    def _append(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        may_stop = seq.num_output >= p.min_tokens  # before min_tokens, EOS and stop tokens were masked
        if may_stop and ((token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids):
            return self._finish(seq, FINISH_STOP)  # the stop token itself is not part of the completion
        seq.tokens.append(token)
        self.stats.generated_tokens += 1
        if self.constraints.accept(seq, token):
            return self._finish(seq, FINISH_STOP)  # the constraint's language is complete
        if p.stop and seq.num_output >= p.min_tokens and self.detokenize is not None and stops.hits_stop(
                self.detokenize(seq.output_ids[-stops.tail_tokens(p.stop):]), p.stop):
            seq.cut = stops.cut_completion(seq.output_ids, p.stop, self.detokenize)
            return self._finish(seq, FINISH_STOP)
        if seq.num_output >= p.max_new_tokens or len(seq.tokens) >= self.scheduler.max_model_len:
            return self._finish(seq, FINISH_LENGTH)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._resolve(seq)

    def _resolve(self, seq: Sequence) -> None:
        assert seq.status is Status.FINISHED
        self.constraints.forget(seq)
        self.penalties.forget(seq)
        self._groups.pop(id(seq)).finish(seq)

    def run_forever(self, stop: threading.Event, heartbeat_s: float = 5.0) -> None:
        """Serve requests until ``stop`` is set (the worker's background thread)."""
        last = time.monotonic()
        try:
            while not stop.is_set():
                if self.has_work():
                    self.step()
                    last = time.monotonic()
                    continue
                with self._lock:
                    self._lock.wait(timeout=0.5)
                if time.monotonic() - last > heartbeat_s:
                    self.runner.heartbeat()
                    last = time.monotonic()
        except BaseException as e:  # a dead step must fail every waiting request, never hang them
            self.fail_all(f"engine failed: {self.failure(e)}")
            raise
        finally:
            with self._lock:
                self._closed = True
            self.runner.stop_followers()

    def fail_all(self, message: str) -> None:
        with self._lock:
            pending = list({id(g): g.future for g in self._groups.values()}.values()) + [f for _, f in self._inbox]
            self._inbox.clear()
            self._groups.clear()
        for f in pending:
            if not f.done():
                f.set_exception(RuntimeError(message))

