"""A request, its sampling parameters, and the sequence the engine grows from it."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

FINISH_STOP = "stop"  # EOS, a stop token or a stop string
FINISH_LENGTH = "length"  # max_new_tokens or max_model_len
FINISH_ERROR = "error"
MAX_LOGPROBS = 20  # the most alternatives a token reports (OpenAI's top_logprobs limit)
MAX_SAMPLES = 1024  # the most samples (n) of one prompt
# Seeds are used modulo this (sampler._row_seed), so a seed and its remainder sample the same tokens.
SEED_MODULUS = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is sampled and when it stops. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # K > 0: each completion token's log-probability and the K most likely tokens at its step
    prompt_logprobs: bool = False  # each prompt token's log-probability given the tokens before it
    n: int = 1  # samples of the prompt: n sequences that share its computed KV blocks
    # vLLM's meanings: repetition_penalty divides (or, if negative, multiplies) the logits of every token in the
    # prompt or the completion so far; presence_penalty and frequency_penalty subtract from the logits of the
    # completion's tokens once, and once per occurrence; min_p drops tokens less likely than min_p x the likeliest;
    # min_tokens: EOS, stop tokens and stop strings are not taken before the completion has that many tokens.
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    min_tokens: int = 0
    # Structured outputs (actors/engine/grammar.py), at most one: the completion is valid for it.
    json_schema: str | None = None  # a JSON Schema, as text
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the completion is one of these strings

    def problems(self) -> list[str]:
        """What is wrong with these values, as text naming each field (empty if all is well)."""
        out = []
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens < 2**31:
            out.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            out.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            out.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:
            out.append(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            out.append(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (0 turns it off), got {self.logprobs!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_SAMPLES:
            out.append(f"n must be an integer in [1, {MAX_SAMPLES}], got {self.n!r}")
        if not self.repetition_penalty > 0:
            out.append(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                out.append(f"{name} must be in [-2, 2] (0 turns it off), got {getattr(self, name)!r}")
        if not 0 <= self.min_p <= 1:
            out.append(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= (
                self.max_new_tokens if isinstance(self.max_new_tokens, int) else 0):
            out.append(f"min_tokens must be an integer in [0, max_new_tokens ({self.max_new_tokens})], got "
                       f"{self.min_tokens!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in self.stop_token_ids):
            out.append(f"stop_token_ids must be a list of token ids (integers >= 0), got {list(self.stop_token_ids)!r}")
        constraints = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(constraints) > 1:
            out.append(f"{constraints[1]} cannot be combined with {constraints[0]}: give one structured-output "
                       f"constraint")
        if constraints and self.ignore_eos:
            out.append(f"ignore_eos cannot be combined with {constraints[0]}: a constrained completion ends with "
                       f"its language")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) and c for c in self.choice)):
            out.append(f"choice must be a non-empty list of non-empty strings, got {list(self.choice)!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            out.append(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")
        return out


def penalized(params: SamplingParams) -> bool:
    """Whether the params penalise tokens already seen (the sampler needs the sequence's tokens)."""
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of sample ``index`` (>= 1) of a request: one sequence, its own seed derived from the request's
    (so every (request, sample) is reproducible, and sample 0 samples exactly as the request alone would), and no
    prompt log-probabilities of its own (it reports sample 0's: the prompt is the same)."""
    seed = None
    if params.seed is not None:
        digest = hashlib.blake2b(f"{params.seed}:{index}".encode(), digest_size=8).digest()
        seed = int.from_bytes(digest, "little") >> 1
    return dataclasses.replace(params, n=1, seed=seed, prompt_logprobs=False)


@dataclass(frozen=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    error: str | None = None
    time_to_first_token_s: float | None = None  # from reaching the engine to its first generated token
    text: str | None = None  # set when a stop string ended it: the text before it (token_ids are cut with it)
    # With params.logprobs: per token, its log-probability and the most likely (token id, log-probability) pairs.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # with params.prompt_logprobs: None for the first token
    sample_index: int = 0  # which of the request's n samples


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request being generated: its tokens, how many are in the KV cache, and its cache blocks."""

    request: Request
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix caching: of the full computed blocks, in order
    status: Status = Status.WAITING
    finish_reason: str | None = None
    error: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cut: tuple[list[int], str] | None = None  # (token ids, text) before the stop string that ended it
    logprobs: list[float] = field(default_factory=list)  # with params.logprobs, one per output token
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # of prompt tokens 1.. (token 0 has no context)
    sample_index: int = 0  # which of its request's n samples (sample 0 computes the prompt; see SampleGroup)
    shared_prompt_logprobs: list[float] | None = None  # a later sample's copy of sample 0's prompt_logprobs
    matcher_started: bool = False  # a structured-output sequence whose grammar matcher exists (engine.Grammars)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt_token_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        """len(output_ids) without copying them (the engine asks every step, for every sequence)."""
        return len(self.tokens) - self.num_prompt

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def completion(self) -> Completion:
        assert self.finish_reason is not None
        ttft = None if self.first_token_at is None else self.first_token_at - self.arrival
        token_ids, text = self.cut if self.cut is not None else (self.output_ids, None)
        n = len(token_ids)
        logprobs = (self.logprobs[:n], self.top_logprobs[:n]) if self.params.logprobs else (None, None)
        prompt = [None, *self.prompt_logprobs] if self.params.prompt_logprobs else None
        if self.shared_prompt_logprobs is not None:
            prompt = [None, *self.shared_prompt_logprobs]
        return Completion(self.request.request_id, token_ids, self.finish_reason, self.num_prompt, self.error, ttft, text,
                          *logprobs, prompt, self.sample_index)


@dataclass(eq=False)
class SampleGroup:
    """The n samples of one request and the future they resolve together. Sample 0 computes the prompt; the others
    are made once its prompt is in the cache and start with its full blocks (``BlockManager.fork``), so the prompt is
    computed once. A request refused before that (its prompt too long) resolves with sample 0's error alone."""

    future: Future
    n: int
    done: dict[int, Completion] = field(default_factory=dict)
    forked: bool = False  # the later samples exist

    def finish(self, seq: Sequence) -> None:
        self.done[seq.sample_index] = seq.completion()
        if len(self.done) == self.n or (not self.forked and seq.sample_index == 0):
            self.future.set_result([self.done[i] for i in sorted(self.done)])
