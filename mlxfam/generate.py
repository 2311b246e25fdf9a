"""The generation loop: chunked prefill, pipelined decode, stop handling and statistics."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .cache import CacheOptions
from .cache import check_integer as _check_integer
from .errors import MlxfamError
from .sample import LogitsProcessor, Sampler, greedy, make_logits_processors, make_sampler, validate_sampling

# Thread-local so that generation also works from a worker thread (a plain stream belongs to
# the thread that created it).
generation_stream = mx.new_thread_local_stream(mx.default_device())


@dataclass
class GenerationResponse:
    text: str  # the new text piece of this step ("" allowed)
    token: int | None
    logprobs: mx.array | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # None while running, then "stop" or "length"


def generate_step(
    prompt_ids: mx.array,
    model,
    *,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
    cache=None,
    prefill_step_size: int = 512,
    max_tokens: int = 256,
) -> Iterator[tuple[int, mx.array]]:
    """Yield `(token id, logprobs of shape (vocab,))` for up to `max_tokens` tokens.

    The prompt but its last token is prefilled in chunks of `prefill_step_size`; the last token
    gives the first logits. Each token's own model step is queued before it is yielded, so when the caller
    stops, the cache holds the prompt and every yielded token (the EOS too). `max_tokens=0`
    does no work.
    """
    prompt_ids = _as_token_array(prompt_ids)
    _check_integer("prefill_step_size", prefill_step_size, minimum=1)
    _check_integer("max_tokens", max_tokens, minimum=0)
    if cache is None:
        cache = model.make_cache()
    return _generate_tokens(
        prompt_ids, model, sampler or greedy, list(logits_processors or []), cache, prefill_step_size, max_tokens
    )


def _generate_tokens(prompt_ids, model, sampler, logits_processors, cache, prefill_step_size, max_tokens):
    if max_tokens == 0:
        return
    # The history the processors see; kept only when someone needs it.
    history = prompt_ids[:0]

    def prefill(chunk: mx.array) -> None:
        nonlocal history
        with mx.stream(generation_stream):
            model(chunk[None], cache=cache)  # logits stay lazy and are never computed
            mx.eval([c.state for c in cache])
        if logits_processors:
            history = mx.concatenate([history, chunk])
        mx.clear_cache()

    def step(inputs: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        with mx.stream(generation_stream):
            logits = model(inputs[None], cache=cache)[:, -1, :]
            if logits_processors:
                history = mx.concatenate([history, inputs])
                for process in logits_processors:
                    logits = process(history, logits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = sampler(logprobs).astype(mx.int32)
        return token, logprobs.squeeze(0)

    # All but the last prompt token go through prefill, whose logits are never computed; the
    # last one is the first decode step, so the head runs over one position only.
    # A family whose first forward must see the whole prompt (ChatGLM-6B's bidirectional prefix,
    # Qwen's NTK alpha taken from the prompt length) gets it in one step.
    while prompt_ids.size > 1 and not getattr(model, "whole_prompt_prefill", False):
        chunk = min(prefill_step_size, prompt_ids.size - 1)
        prefill(prompt_ids[:chunk])
        prompt_ids = prompt_ids[chunk:]

    token, logprobs = step(prompt_ids)
    mx.async_eval(token, logprobs)
    for n in range(max_tokens):
        # Queue the next step before the host waits on this token, so the device never idles.
        next_token, next_logprobs = step(token)
        mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        if n % 256 == 255:
            mx.clear_cache()
        token, logprobs = next_token, next_logprobs


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int] | mx.array,
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_context_size: int = 20,
    seed: int | None = None,
    stop: Sequence[str] = (),
    prefill_step_size: int = 512,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = CacheOptions.kv_group_size,
    quantized_kv_start: int = 0,
    cache=None,
    logits_processors: Sequence[LogitsProcessor] | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt`, yielding one GenerationResponse per generated token.

    Arguments are checked when this is called, before any work. A str prompt is encoded with
    `tokenizer.encode`. A given `cache` is extended in place: only the new prompt ids are
    prefilled, and afterwards it holds the prompt and every generated token (the EOS or the
    token that completed a stop string included). Without one, the cache is
    `model.make_cache(...)` with the CacheOptions of `max_kv_size`, `kv_bits`, `kv_group_size` and
    `quantized_kv_start`, passed as the keywords that differ from the defaults (mlx-lm's protocol);
    with a given cache these make no new one, and `max_kv_size` only says that the cache is
    bounded, which lifts the context-length check.
    """
    check_generation_options(
        max_tokens=max_tokens,
        temp=temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        stop=stop,
        prefill_step_size=prefill_step_size,
    )
    cache_options = CacheOptions(
        kv_bits=kv_bits, kv_group_size=kv_group_size, max_kv_size=max_kv_size, quantized_kv_start=quantized_kv_start
    )
    stop_strings = (stop,) if isinstance(stop, str) else tuple(stop)
    sampler = make_sampler(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p)
    processors = make_logits_processors(repetition_penalty, repetition_context_size)
    processors += list(logits_processors or [])
    prompt_ids = _as_token_array(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
    if cache is None:
        cache = model.make_cache(**cache_options.keywords)
    if max_kv_size is None:
        max_tokens = _fit_to_context(model, cache, prompt_ids.size, max_tokens)
    token_generator = generate_step(
        prompt_ids,
        model,
        sampler=sampler,
        logits_processors=processors,
        cache=cache,
        prefill_step_size=prefill_step_size,
        max_tokens=max_tokens,
    )
    if seed is not None:
        mx.random.seed(seed)
    return _stream_responses(token_generator, tokenizer, prompt_ids.size, max_tokens, stop_strings)


def _stream_responses(token_generator, tokenizer, prompt_tokens, max_tokens, stop_strings):
    eos_token_ids = set(tokenizer.eos_token_ids)
    detokenizer = tokenizer.detokenizer()
    stop_filter = _StopStringFilter(stop_strings)
    if max_tokens == 0:
        peak_memory = mx.get_peak_memory() / 1e9
        yield GenerationResponse("", None, None, prompt_tokens, 0.0, 0, 0.0, peak_memory, "length")
        return

    start = time.perf_counter()
    for n, (token, logprobs) in enumerate(token_generator, start=1):
        now = time.perf_counter()
        if n == 1:
            prompt_tps = prompt_tokens / (now - start)
            decode_start = now
        # The first token comes out of prefill, so decode speed counts the tokens after it.
        generation_tps = (n - 1) / (now - decode_start) if n > 1 else 0.0

        if token in eos_token_ids:
            text, finish_reason = detokenizer.finalize(), "stop"
        else:
            text, finish_reason = detokenizer.add_token(token), None
            if n == max_tokens:
                text, finish_reason = text + detokenizer.finalize(), "length"
        text, stopped = stop_filter.push(text)
        if stopped:
            finish_reason = "stop"
        elif finish_reason is not None:
            text += stop_filter.flush()

        yield GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=generation_tps,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
        )
        if finish_reason is not None:
            return


def generate(model, tokenizer, prompt: str | list[int] | mx.array, verbose: bool = False, **kwargs) -> str:
    """Return the whole generated text; `verbose` prints it as it streams, then the statistics.

    Keyword arguments are those of `stream_generate`.
    """
    if verbose:
        print("=" * 10)
    pieces = []
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        pieces.append(response.text)
        if verbose:
            print(response.text, end="", flush=True)
    if verbose:
        print()
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    return "".join(pieces)


def check_generation_options(
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    repetition_context_size: int = 20,
    stop: Sequence[str] = (),
    prefill_step_size: int = 512,
    seed: int | None = None,
) -> None:
    """Raises MlxfamError naming the first bad `stream_generate` argument but the cache options
    (CacheOptions checks those; callers such as the CLI check both before the slow model load)."""
    stop_strings = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise MlxfamError(f"stop must be non-empty strings, got {stop!r}")
    _check_integer("max_tokens", max_tokens, minimum=0)
    _check_integer("prefill_step_size", prefill_step_size, minimum=1)
    validate_sampling(temp, top_k, top_p, min_p)
    make_logits_processors(repetition_penalty, repetition_context_size)  # validates both


def _as_token_array(prompt_ids) -> mx.array:
    if isinstance(prompt_ids, mx.array):
        ids = prompt_ids.astype(mx.int32)
    else:
        ids = mx.array(list(prompt_ids), dtype=mx.int32)
    if ids.ndim != 1 or ids.size == 0:
        raise MlxfamError(f"prompt must be a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


def _fit_to_context(model, cache, prompt_tokens: int, max_tokens: int) -> int:
    """Refuse a prompt that overflows the model's context; cap `max_tokens` so it fits."""
    context_length = getattr(model, "context_length", None)
    if context_length is None:
        return max_tokens
    cached_tokens = cache[0].offset if cache else 0
    if cached_tokens + prompt_tokens > context_length:
        in_cache = f" (after {cached_tokens} tokens already in the cache)" if cached_tokens else ""
        raise MlxfamError(
            f"the prompt has {prompt_tokens} tokens{in_cache} but the model's context is "
            f"{context_length} tokens; shorten the prompt or pass --max-kv-size (max_kv_size) "
            "to keep only the most recent tokens"
        )
    return min(max_tokens, context_length - cached_tokens - prompt_tokens)


class _StopStringFilter:
    """Passes text through until a stop string appears, holding back any tail that could be the
    start of one (a stop string may arrive split across tokens)."""

    def __init__(self, stop_strings: tuple[str, ...]):
        self.stop_strings = stop_strings
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return the text that is safe to emit, and whether a stop string was found."""
        self.pending += text
        starts = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if starts:
            emitted, self.pending = self.pending[: min(starts)], ""
            return emitted, True
        held = max(
            (k for s in self.stop_strings for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        split = len(self.pending) - held
        emitted, self.pending = self.pending[:split], self.pending[split:]
        return emitted, False

    def flush(self) -> str:
        emitted, self.pending = self.pending, ""
        return emitted
