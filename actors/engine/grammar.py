"""Structured outputs: a sequence whose params name a JSON schema, a regular expression or a list of choices samples
only tokens that keep its completion inside that language, and stops when the language is complete.

xgrammar (PyPI ``xgrammar``, what vLLM uses by default) compiles each constraint once per replica against the
model's tokenizer (cached by its text) and gives, per step, a bitmask of the allowed tokens, computed on the host in
tens of microseconds (benchmarks/README.md). The masks of a step's constrained rows are applied to a copy of their
logits on the device in one call, so unconstrained rows sample exactly as they would alone, and their
log-probabilities are the model's own (before the mask, as before temperature).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from shardgen.actors.engine.sequence import SamplingParams, Sequence


def constraint_of(params: SamplingParams) -> tuple[str, str] | None:
    """(kind, text) of the params' constraint: ``json_schema``, ``regex`` or ``choice`` (None: unconstrained)."""
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        return "choice", json.dumps(list(params.choice))
    return None


class Grammars:
    """One replica's grammar compiler over its tokenizer, the grammars it compiled, and the matchers of its
    constrained sequences (keyed by the caller: one per sequence)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self.info)
        self._compiled: dict[tuple[str, str], object] = {}
        self._matchers: dict[int, object] = {}

    def compile(self, kind: str, text: str):
        """The compiled grammar of a constraint; ValueError naming the field when it is not valid."""
        key = (kind, text)
        if key not in self._compiled:
            try:
                if kind == "json_schema":
                    # compact JSON: a model may not pad it with whitespace without end
                    grammar = self._compiler.compile_json_schema(text, any_whitespace=False)
                elif kind == "regex":
                    grammar = self._compiler.compile_regex(text)
                else:
                    choices = json.loads(text)
                    ebnf = "root ::= " + " | ".join(json.dumps(c) for c in choices)
                    grammar = self._compiler.compile_grammar(ebnf)
            except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
                raise ValueError(f"{kind}: not a valid {kind.replace('_', ' ')} ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
            self._compiled[key] = grammar
        return self._compiled[key]

    def start(self, key: int, params: SamplingParams) -> None:
        """A matcher for a new constrained sequence (``key``: the caller's name for it)."""
        self._matchers[key] = self._xgr.GrammarMatcher(self.compile(*constraint_of(params)))

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
        """A copy of ``logits`` (B, V) with each listed (row, key) row's disallowed tokens at -inf."""
        masked = logits.clone()
        bitmask = self._xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, (_, key) in enumerate(rows):
            self._matchers[key].fill_next_token_bitmask(bitmask, j)
        picked = torch.tensor([r for r, _ in rows], device=logits.device)
        sub = masked[picked, : self.vocab_size].float()
        self._xgr.apply_token_bitmask_inplace(sub, bitmask.to(logits.device))
        masked[picked, : self.vocab_size] = sub.to(masked.dtype)
        if masked.shape[1] > self.vocab_size:  # padded vocabulary columns are never tokens
            masked[picked, self.vocab_size:] = float("-inf")
        return masked

    def accept(self, key: int, token: int) -> bool:
        """Advance ``key``'s matcher by ``token``; True when its language is complete (nothing more may follow)."""
        matcher = self._matchers[key]
        assert matcher.accept_token(token), "a masked sampler chose a token its grammar forbids"
        return matcher.is_terminated()

    def forget(self, key: int) -> None:
        self._matchers.pop(key, None)


class Constraints:
    """The engine's side of structured outputs: the replica's ``Grammars``, made at the first constrained request
    (``make_grammars``; None: an engine without its tokenizer), and the matchers of its constrained sequences."""

    def __init__(self, make_grammars: Callable[[], Grammars] | None) -> None:
        self._make = make_grammars
        self._grammars: Grammars | None = None

    def problem(self, params: SamplingParams) -> str | None:
        """Why a request's constraint cannot run here (None: it can, or there is none): it is compiled now, once."""
        constraint = constraint_of(params)
        if constraint is None:
            return None
        if self._grammars is None:
            if self._make is None:
                return f"{constraint[0]}: this engine was built without its tokenizer, which structured outputs need"
            self._grammars = self._make()
        try:
            self._grammars.compile(*constraint)
        except ValueError as e:
            return str(e)
        return None

    def masked(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``logits`` (row i for ``seqs[i]``) with each constrained row's forbidden tokens masked (a copy), or
        ``logits`` itself when no row is constrained."""
        rows = []
        for i, seq in enumerate(seqs):
            if constraint_of(seq.params) is not None:
                if not seq.matcher_started:
                    self._grammars.start(id(seq), seq.params)
                    seq.matcher_started = True
                rows.append((i, id(seq)))
        return self._grammars.mask(logits, rows) if rows else logits

    def accept(self, seq: Sequence, token: int) -> bool:
        """Advance a constrained sequence by ``token``; True when its language is complete."""
        return seq.matcher_started and self._grammars.accept(id(seq), token)

    def forget(self, seq: Sequence) -> None:
        if seq.matcher_started:
            self._grammars.forget(id(seq))
