"""Perplexity: exp of the mean negative log-likelihood of each token given the ones before it."""

from __future__ import annotations

import math

import mlx.core as mx

from .errors import MlxfamError


def perplexity(model, tokens, chunk_size: int = 512, cache: list | None = None) -> float:
    """The perplexity of `tokens` (ids; the first is context only, the other len - 1 are predicted).

    The tokens go through the model in chunks of `chunk_size` with a KV cache (`cache`, default
    `model.make_cache()`), so a text longer than one forward is scored with the same attention as
    generation; a family that must see its whole prompt at once gets it in one forward.
    """
    ids = mx.array(tokens.tolist() if hasattr(tokens, "tolist") else list(tokens), dtype=mx.int32).reshape(-1)
    if ids.size < 2:
        raise MlxfamError(f"perplexity needs at least 2 tokens, got {ids.size}")
    if chunk_size < 1:
        raise MlxfamError(f"chunk_size must be >= 1, got {chunk_size}")
    context = getattr(model, "context_length", None)
    if context is not None and ids.size > context:
        raise MlxfamError(f"{ids.size} tokens exceed the model's context length of {context} tokens")
    cache = model.make_cache() if cache is None else cache
    step = ids.size - 1 if getattr(model, "whole_prompt_prefill", False) else chunk_size
    inputs, targets = ids[:-1], ids[1:]
    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, inputs.size, step):
        logits = model(inputs[None, start : start + step], cache=cache)[0].astype(mx.float32)
        chunk_targets = targets[start : start + step]
        picked = mx.take_along_axis(logits, chunk_targets[:, None], axis=-1)[:, 0]
        total = total + (mx.logsumexp(logits, axis=-1) - picked).sum()
        mx.eval(total)  # one sync per chunk frees its logits before the next
    return math.exp(total.item() / targets.size)
