"""Samplers and logits processors, composed the way mlx-lm composes them.

A sampler maps log-probabilities `(B, vocab)` to token ids `(B,)`. A logits processor maps
`(tokens, logits)` to new logits, where `tokens` is the 1-D history (prompt included) and
`logits` is `(1, vocab)`. Both run on the device as lazy MLX graphs, so they cost no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from .errors import MlxfamError

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def validate_sampling(temp: float, top_k: int, top_p: float, min_p: float) -> None:
    # `not x >= 0` style comparisons also reject NaN.
    if not temp >= 0:
        raise MlxfamError(f"temp must be >= 0, got {temp}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise MlxfamError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise MlxfamError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if not 0 <= min_p <= 1:
        raise MlxfamError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the `top_k` most likely tokens (ties at the boundary broken arbitrarily)."""
    if top_k >= logprobs.shape[-1]:
        return logprobs
    dropped = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-math.inf, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability mass reaches `top_p`."""
    ascending = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ascending.astype(mx.float32))
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    # Normalise by the total so already-filtered (unnormalised) inputs work too.
    total = mass_above[..., :1] + probs[..., :1]
    num_dropped = (mass_above >= top_p * total).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(ascending, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -math.inf, logprobs)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the top token's."""
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs < threshold, -math.inf, logprobs)


def categorical(logprobs: mx.array, temp: float) -> mx.array:
    return mx.random.categorical(logprobs * (1 / temp))


def make_sampler(temp: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Sampler:
    """Greedy when `temp` is 0; otherwise filter by top-p, min-p, top-k, then sample at `temp`."""
    validate_sampling(temp, top_k, top_p, min_p)
    if temp == 0:
        return greedy
    filters = []
    if top_p < 1:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def sample(logprobs: mx.array) -> mx.array:
        for keep in filters:
            logprobs = keep(logprobs)
        return categorical(logprobs, temp)

    # One fused graph per step; the random state is threaded through so `seed` reproduces draws.
    return mx.compile(sample, inputs=mx.random.state, outputs=mx.random.state)


def make_repetition_penalty(penalty: float, context_size: int = 20) -> LogitsProcessor:
    """HF's repetition penalty over the last `context_size` tokens: divide positive logits by
    `penalty`, multiply negative ones by it."""
    if not penalty > 0:
        raise MlxfamError(f"repetition_penalty must be > 0 (1 disables it), got {penalty}")
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size < 1:
        raise MlxfamError(f"repetition_context_size must be an integer >= 1, got {context_size}")

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            return logits
        recent = tokens[None, -context_size:]
        selected = mx.take_along_axis(logits, recent, axis=-1)
        penalized = mx.where(selected < 0, selected * penalty, selected / penalty)
        # A put (not a multiply) so a token repeated in the window is penalised once.
        return mx.put_along_axis(logits, recent, penalized, axis=-1)

    return penalize


def make_logits_processors(repetition_penalty: float = 1.0, repetition_context_size: int = 20) -> list[LogitsProcessor]:
    # Built even when off so that both arguments are always validated.
    penalty = make_repetition_penalty(repetition_penalty, repetition_context_size)
    return [] if repetition_penalty == 1 else [penalty]
