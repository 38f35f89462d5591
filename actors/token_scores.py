"""What the generation engine sends per token when a request asks for log-probabilities, in a module of
its own so that the HTTP/gRPC ingress reads it without importing torch."""

from __future__ import annotations

from typing import NamedTuple


class Scored(NamedTuple):
    """A token, its log-probability (None for a prompt's first token, which nothing predicts) and the
    likeliest tokens at its position, id -> log-probability, best first."""
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]
