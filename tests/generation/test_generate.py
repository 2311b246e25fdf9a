"""Generation loop and samplers, against a tiny deterministic toy model and tokenizer."""

import threading

import mlx.core as mx
import numpy as np
import pytest

from mlxfam.errors import MlxfamError
from mlxfam.generate import generate, generate_step, stream_generate
from mlxfam.sample import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_repetition_penalty,
    make_sampler,
)

CHARS = "abcdefghijklmnopqrstuvwxyz .,!"  # one character per token: ids 0..29
VOCAB_SIZE = 32  # ids 30 and 31 are special tokens with no text


class ToyCache:
    """Stores the token ids seen so far, like a KV cache stores their keys and values."""

    def __init__(self):
        self.tokens = mx.zeros((1, 0), dtype=mx.int32)

    @property
    def offset(self):
        return self.tokens.shape[1]

    @property
    def state(self):
        return self.tokens

    def update(self, inputs):
        self.tokens = mx.concatenate([self.tokens, inputs], axis=1)
        return self.tokens


class ToyModel:
    """Logits depend on every prior token and its position, in exact integer arithmetic, so any
    chunking of the prompt gives bit-identical logits. The argmax is always a text token."""

    def __init__(self, context_length=None):
        self.context_length = context_length
        self.calls = []  # input length of every model call
        self.make_cache_kwargs = []

    def make_cache(self, **kwargs):
        self.make_cache_kwargs.append(kwargs)
        return [ToyCache()]

    def __call__(self, inputs, cache):
        assert inputs.dtype == mx.int32 and inputs.ndim == 2
        self.calls.append(inputs.shape[1])
        start = cache[0].offset
        history = cache[0].update(inputs)
        positions = mx.arange(history.shape[1])
        score = mx.cumsum((history + 1) * (positions + 1), axis=1)[:, start:]
        target = (score * 7 + score // 31 + 3) % len(CHARS)
        distance = (mx.arange(VOCAB_SIZE) - target[..., None]) % VOCAB_SIZE
        return -0.5 * distance.astype(mx.float32)


def reference_logits(ids):
    """Last-position logits of `ids` computed in one pass with a fresh cache."""
    model = ToyModel()
    return np.array(model(mx.array([ids], dtype=mx.int32), cache=model.make_cache())[0, -1])


def log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class ToyDetokenizer:
    """Emits each token's text one token late, as real streaming detokenizers may."""

    def __init__(self):
        self.held = ""

    def add_token(self, token):
        text, self.held = self.held, CHARS[token] if token < len(CHARS) else ""
        return text

    def finalize(self):
        text, self.held = self.held, ""
        return text


class ToyTokenizer:
    def __init__(self, eos_token_ids=(31,)):
        self.eos_token_ids = list(eos_token_ids)

    def encode(self, text, add_special_tokens=True):
        return [CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids if i < len(CHARS))

    def detokenizer(self):
        return ToyDetokenizer()


PROMPT = "hello world"


def run(prompt=PROMPT, model=None, tokenizer=None, **kwargs):
    responses = list(stream_generate(model or ToyModel(), tokenizer or ToyTokenizer(), prompt, **kwargs))
    return responses, [r.token for r in responses], "".join(r.text for r in responses)


# --- generation loop -------------------------------------------------------------------------


def test_greedy_is_argmax_of_the_model_and_deterministic():
    ids = ToyTokenizer().encode(PROMPT)
    steps = list(generate_step(mx.array(ids), ToyModel(), max_tokens=12))
    for token, logprobs in steps:
        logits = reference_logits(ids)
        assert token == int(np.argmax(logits))
        np.testing.assert_allclose(np.array(logprobs), log_softmax(logits), rtol=1e-6, atol=1e-6)
        ids.append(token)
    assert len(set(ids[-12:])) > 3  # the toy model is not stuck on one token
    assert [t for t, _ in generate_step(mx.array(ids[:11]), ToyModel(), max_tokens=12)] == ids[11:]


@pytest.mark.parametrize("prefill_step_size, expected_prefill_calls", [(1, [1] * 10), (3, [3, 3, 3, 1]), (512, [10])])
def test_chunked_prefill_matches_one_pass(prefill_step_size, expected_prefill_calls):
    prompt = mx.array(ToyTokenizer().encode(PROMPT))
    one_pass = list(generate_step(prompt, ToyModel(), prefill_step_size=512, max_tokens=6))
    model = ToyModel()
    chunked = list(generate_step(prompt, model, prefill_step_size=prefill_step_size, max_tokens=6))
    assert [t for t, _ in chunked] == [t for t, _ in one_pass]
    for (_, a), (_, b) in zip(chunked, one_pass):
        assert np.array_equal(np.array(a), np.array(b))
    # Prefill takes all but the last prompt token, which gives the first logits; then one call
    # per token (the last one fed too).
    assert model.calls == expected_prefill_calls + [1] + [1] * 6


def test_str_list_and_array_prompts_agree():
    ids = ToyTokenizer().encode(PROMPT)
    results = [run(prompt, max_tokens=5)[1] for prompt in (PROMPT, ids, mx.array(ids))]
    assert results[0] == results[1] == results[2]


def greedy_reference(max_tokens=20):
    _, tokens, text = run(tokenizer=ToyTokenizer(eos_token_ids=[]), max_tokens=max_tokens)
    return tokens, text


@pytest.mark.parametrize("eos_position", [0, 1])
def test_each_eos_id_stops_and_is_not_emitted(eos_position):
    tokens, text = greedy_reference()
    stop_at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    eos_ids = [tokens[stop_at], 31] if eos_position == 0 else [30, tokens[stop_at]]
    responses, got, got_text = run(tokenizer=ToyTokenizer(eos_ids), max_tokens=20)
    assert got == tokens[: stop_at + 1]
    assert got_text == text[:stop_at]
    assert [r.finish_reason for r in responses] == [None] * stop_at + ["stop"]


def test_stop_string_split_across_tokens_is_trimmed():
    _, text = greedy_reference()
    stop = text[6:9]
    expected = text[: text.index(stop)]
    responses, _, got_text = run(tokenizer=ToyTokenizer([]), max_tokens=20, stop=["#never", stop])
    assert got_text == expected
    assert responses[-1].finish_reason == "stop"
    # Stops on the token that completes it, which the one-late detokenizer shows a token later.
    assert len(responses) == text.index(stop) + len(stop) + 1
    assert run(tokenizer=ToyTokenizer([]), max_tokens=20, stop=stop)[2] == expected  # a bare str


def test_held_back_text_is_released_when_no_stop_string_follows():
    _, text = greedy_reference()
    almost = text[6:9] + "#"  # its first three characters appear, the fourth never does
    responses, _, got_text = run(tokenizer=ToyTokenizer([]), max_tokens=20, stop=[almost])
    assert got_text == text
    assert responses[-1].finish_reason == "length"
    assert "".join(r.text for r in responses[:9]) == text[:6]  # held back while undecided


def test_max_tokens_finishes_with_length():
    _, text = greedy_reference()
    responses, tokens, got_text = run(tokenizer=ToyTokenizer([]), max_tokens=5)
    assert len(tokens) == 5 and got_text == text[:5]
    assert [r.finish_reason for r in responses] == [None] * 4 + ["length"]
    (response,) = run(max_tokens=0)[0]
    assert (response.token, response.text, response.finish_reason) == (None, "", "length")


def test_stats_are_populated():
    responses, _, _ = run(tokenizer=ToyTokenizer([]), max_tokens=4)
    assert [r.generation_tokens for r in responses] == [1, 2, 3, 4]
    for r in responses:
        assert r.prompt_tokens == len(PROMPT) and r.prompt_tps > 0 and r.peak_memory >= 0
        assert r.logprobs.shape == (VOCAB_SIZE,)
    assert all(r.generation_tps > 0 for r in responses[1:])


def test_generate_verbose_prints_text_and_stats(capsys):
    _, text = greedy_reference(6)
    assert generate(ToyModel(), ToyTokenizer([]), PROMPT, verbose=True, max_tokens=6) == text
    out = capsys.readouterr().out
    assert text in out
    assert f"Prompt: {len(PROMPT)} tokens, " in out and "Generation: 6 tokens, " in out
    assert "tokens-per-sec" in out and "Peak memory: " in out and out.rstrip().endswith("GB")


def test_reused_cache_prefills_only_new_ids_and_continues_the_sequence():
    model, tokenizer = ToyModel(), ToyTokenizer([])
    cache = model.make_cache()
    first = run("hello", model, tokenizer, max_tokens=4, cache=cache)[1]
    assert cache[0].offset == 5 + 4  # prompt and every generated token
    model.calls.clear()
    second = run(" world", model, tokenizer, max_tokens=4, cache=cache)[1]
    assert model.calls == [5, 1, 1, 1, 1, 1]  # the new ids but the last, then one per token
    whole = tokenizer.encode("hello") + first + tokenizer.encode(" world")
    assert second == run(whole, max_tokens=4)[1]


def test_generation_runs_in_a_worker_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(run(max_tokens=3)[1]))
    worker.start()
    worker.join()
    assert results == [run(max_tokens=3)[1]]


# --- context length ----------------------------------------------------------------------------


def test_prompt_longer_than_context_is_refused():
    with pytest.raises(MlxfamError, match=r"11 tokens.*context is 10 tokens.*--max-kv-size"):
        stream_generate(ToyModel(context_length=10), ToyTokenizer(), PROMPT)


def test_max_kv_size_lifts_the_context_check_and_reaches_the_cache():
    model = ToyModel(context_length=10)
    assert len(run(model=model, max_tokens=3, max_kv_size=16)[1]) == 3
    assert model.make_cache_kwargs == [{"max_kv_size": 16}]


def test_generation_stops_at_the_context_limit():
    model = ToyModel(context_length=13)
    responses, tokens, _ = run(model=model, tokenizer=ToyTokenizer([]), max_tokens=10)
    assert len(tokens) == 2 and responses[-1].finish_reason == "length"
    cache = model.make_cache()
    run("hello", model, ToyTokenizer([]), max_tokens=4, cache=cache)
    with pytest.raises(MlxfamError, match=r"5 tokens \(after 9 tokens already in the cache\)"):
        stream_generate(model, ToyTokenizer(), "hello", cache=cache)


# --- samplers and processors -------------------------------------------------------------------

PROBS = np.array([0.5, 0.25, 0.15, 0.1], dtype=np.float32)
LOGPROBS = mx.array(np.log(PROBS))[None]


def kept(filtered):
    return set(np.flatnonzero(np.isfinite(np.array(filtered[0]))).tolist())


def draws(sampler, logprobs, n=4000):
    return np.array(sampler(mx.broadcast_to(logprobs, (n, logprobs.shape[-1]))))


@pytest.mark.parametrize("top_p, expected", [(0.4, {0}), (0.7, {0, 1}), (0.8, {0, 1, 2}), (0.95, {0, 1, 2, 3})])
def test_top_p_keeps_the_nucleus(top_p, expected):
    assert kept(apply_top_p(LOGPROBS, top_p)) == expected
    assert set(draws(make_sampler(temp=1.0, top_p=top_p), LOGPROBS).tolist()) == expected


@pytest.mark.parametrize("min_p, expected", [(1.0, {0}), (0.4, {0, 1}), (0.25, {0, 1, 2}), (0.1, {0, 1, 2, 3})])
def test_min_p_keeps_tokens_near_the_top(min_p, expected):
    assert kept(apply_min_p(LOGPROBS, min_p)) == expected
    assert set(draws(make_sampler(temp=1.0, min_p=min_p), LOGPROBS).tolist()) == expected


@pytest.mark.parametrize("top_k, expected", [(1, {0}), (3, {0, 1, 2}), (4, {0, 1, 2, 3}), (9, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(apply_top_k(LOGPROBS, top_k)) == expected


def test_top_k_1_sampling_equals_greedy():
    assert run(max_tokens=10, temp=1.5, top_k=1, seed=1)[1] == run(max_tokens=10)[1]


def test_temperature_sampling_is_seeded_and_matches_softmax():
    logits = np.array([1.0, 0.5, 0.0, -1.0, 2.0], dtype=np.float32)
    logprobs = mx.array(log_softmax(logits))[None]
    sampler = make_sampler(temp=0.7)
    mx.random.seed(3)
    first = draws(sampler, logprobs)
    mx.random.seed(3)
    assert np.array_equal(first, draws(sampler, logprobs))
    frequencies = np.bincount(first, minlength=len(logits)) / len(first)
    expected = np.exp(log_softmax(logits / 0.7))
    np.testing.assert_allclose(frequencies, expected, atol=0.03)


def test_seed_makes_sampled_generation_reproducible():
    sampled = [run(tokenizer=ToyTokenizer([]), max_tokens=12, temp=1.0, seed=7)[1] for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != run(tokenizer=ToyTokenizer([]), max_tokens=12)[1]


def hf_repetition_penalty(tokens, logits, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor: gather, scale by sign, scatter."""
    scores = logits.copy()
    score = scores[:, tokens]
    scores[:, tokens] = np.where(score < 0, score * penalty, score / penalty)
    return scores


@pytest.mark.parametrize("context_size", [20, 2])
def test_repetition_penalty_matches_hf(context_size):
    logits = np.array([[2.0, -1.0, 0.5, 3.0, -0.5]], dtype=np.float32)
    tokens = [0, 1, 1, 4]
    penalize = make_repetition_penalty(1.5, context_size)
    got = penalize(mx.array(tokens), mx.array(logits))
    np.testing.assert_allclose(np.array(got), hf_repetition_penalty(tokens[-context_size:], logits, 1.5))


def test_repetition_penalty_covers_the_prompt_in_generation():
    ids = ToyTokenizer().encode(PROMPT)
    first = run(max_tokens=1, repetition_penalty=2.0, repetition_context_size=5)[0][0]
    expected = log_softmax(hf_repetition_penalty(ids[-5:], reference_logits(ids)[None], 2.0)[0])
    np.testing.assert_allclose(np.array(first.logprobs), expected, rtol=1e-6, atol=1e-6)


def test_logits_processors_see_prompt_and_generated_tokens():
    seen = []

    def record(tokens, logits):
        seen.append(tokens)
        return logits

    _, tokens, _ = run(tokenizer=ToyTokenizer([]), max_tokens=3, logits_processors=[record])
    ids = ToyTokenizer().encode(PROMPT)
    assert [t.size for t in seen] == [11, 12, 13, 14]
    assert seen[-1].tolist() == ids + tokens


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"temp": -1.0}, "temp"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_context_size": 0}, "repetition_context_size"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"prefill_step_size": 0}, "prefill_step_size"),
        ({"max_kv_size": 0}, "max_kv_size"),
        ({"stop": [""]}, "stop"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    kwargs = {"prompt": PROMPT, **kwargs}
    with pytest.raises(MlxfamError, match=rf"^{name} must"):
        stream_generate(ToyModel(), ToyTokenizer(), **kwargs)


def test_seeded_sampling_reproduces_mlx_lm():
    lm_generate = pytest.importorskip("mlx_lm.generate")
    lm_sample = pytest.importorskip("mlx_lm.sample_utils")
    settings = {"temp": 0.8, "top_p": 0.9, "min_p": 0.02, "top_k": 12}
    ours = run(tokenizer=ToyTokenizer([]), max_tokens=12, seed=5, repetition_penalty=1.3, **settings)[1]

    model = ToyModel()
    mx.random.seed(5)
    theirs = lm_generate.generate_step(
        mx.array(ToyTokenizer().encode(PROMPT)),
        lambda inputs, cache: model(inputs.astype(mx.int32), cache),  # mlx-lm feeds back uint32
        prompt_cache=model.make_cache(),
        sampler=lm_sample.make_sampler(**settings),
        logits_processors=lm_sample.make_logits_processors(repetition_penalty=1.3),
        max_tokens=12,
    )
    assert ours == [token for token, _ in theirs]
