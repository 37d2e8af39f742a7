"""The generation engine of one replica (runs on rank 0).

Requests may be added from any thread at any time (several Ray Data batches in
flight keep it full); ``step`` schedules one continuous-batching step, runs the
model on every rank, samples, and finishes sequences on EOS, stop tokens, stop
strings, ``max_new_tokens`` or ``max_model_len``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from actors.config import EngineConfig
from actors.runner import ModelRunner
from actors.sampler import sample
from actors.scheduler import Scheduler, SchedulerConfig
from actors.sequence import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    Request,
    Sequence,
    Status,
)


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    running_per_step: list[int] = field(default_factory=list)


class Engine:
    def __init__(self, runner: ModelRunner, config: EngineConfig, max_model_len: int, eos_token_ids: set[int],
                 detokenize: Callable[[list[int]], str] | None = None) -> None:
        self.runner = runner
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=runner.num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len))
        self.eos_token_ids = set(eos_token_ids)
        self.detokenize = detokenize
        self.stats = EngineStats()
        self._inbox: list[tuple[Request, Future]] = []
        self._futures: dict[int, Future] = {}
        self._lock = threading.Condition()
        self._closed = False

    # -- intake (any thread)

    def add(self, requests: list[Request]) -> list[Future]:
        futures = [Future() for _ in requests]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            self._inbox.extend(zip(requests, futures))
            self._lock.notify()
        return futures

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Add requests and step until they are done (single-threaded use: tests, benchmarks)."""
        futures = self.add(requests)
        while not all(f.done() for f in futures):
            self.step()
        return [f.result() for f in futures]

    # -- the loop (one thread)

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work()

    def step(self) -> int:
        """One scheduling step; returns how many tokens it ran."""
        with self._lock:
            for request, future in self._inbox:
                seq = Sequence(request)
                self._futures[id(seq)] = future
                self.scheduler.add(seq)
            self._inbox.clear()
        batch, refused = self.scheduler.schedule()
        for seq in refused:
            self._resolve(seq)
        if not batch.seqs:
            return 0
        logits = self.runner.execute(self.runner.prepare(batch))
        sampled = [s for i, s in enumerate(batch.seqs) if batch.samples(i)]
        tokens = sample(logits, [s.params for s in sampled], [len(s.output_ids) for s in sampled])
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if seq.num_computed < seq.num_prompt:
                self.stats.prompt_tokens += min(n, seq.num_prompt - seq.num_computed)
            seq.num_computed += n
        for seq, token in zip(sampled, tokens):
            self._append(seq, token)
        self.stats.steps += 1
        self.stats.running_per_step.append(len(batch.seqs))
        return batch.total_tokens

    def _append(self, seq: Sequence, token: int) -> None:
        p = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return self._finish(seq, FINISH_STOP)  # the stop token itself is not part of the completion
        seq.tokens.append(token)
        self.stats.generated_tokens += 1
        if p.stop and self.detokenize is not None and self._hit_stop_string(seq):
            return self._finish(seq, FINISH_STOP)
        if len(seq.output_ids) >= p.max_new_tokens or len(seq.tokens) >= self.scheduler.config.max_model_len:
            return self._finish(seq, FINISH_LENGTH)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # Decode only a tail long enough to hold the longest stop string (a token is >= 1 character).
        window = max(len(s) for s in seq.params.stop) + 8
        text = self.detokenize(seq.output_ids[-window:])
        return any(s in text for s in seq.params.stop)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self._resolve(seq)

    def _resolve(self, seq: Sequence) -> None:
        assert seq.status is Status.FINISHED
        self._futures.pop(id(seq)).set_result(seq.completion())

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
            self.fail_all(f"engine failed: {type(e).__name__}: {e}")
            raise
        finally:
            with self._lock:
                self._closed = True
            self.runner.stop_followers()

    def fail_all(self, message: str) -> None:
        with self._lock:
            pending = list(self._futures.values()) + [f for _, f in self._inbox]
            self._inbox.clear()
            self._futures.clear()
        for f in pending:
            if not f.done():
                f.set_exception(RuntimeError(message))

