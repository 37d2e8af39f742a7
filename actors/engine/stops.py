"""Where a completion that hit a stop string ends: its text is cut before the earliest stop string, and its token
ids are those wholly before the cut (vLLM's ``include_stop_str_in_output=False``). A token that straddles the cut
(text before the stop string merged with its start) goes with it."""

from __future__ import annotations

from typing import Callable


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to the earliest of ``stops`` (all of it if none occurs)."""
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


def hits_stop(tail: str, stops: tuple[str, ...]) -> bool:
    return any(s in tail for s in stops)


def tail_tokens(stops: tuple[str, ...]) -> int:
    """How many of the last tokens to decode to see any stop string that ends in the newest one: each token is at
    least one character, and a few more absorb tokenizers that merge characters across token boundaries."""
    return max(len(s) for s in stops) + 8


def cut_completion(token_ids: list[int], stops: tuple[str, ...],
                   decode: Callable[[list[int]], str]) -> tuple[list[int], str]:
    """(token ids, text) of a completion cut before its earliest stop string."""
    text = cut_at_stop(decode(token_ids), stops)
    k = len(token_ids)
    while k > 0 and not text.startswith(decode(token_ids[:k])):  # walks back a token or two
        k -= 1
    return token_ids[:k], text
