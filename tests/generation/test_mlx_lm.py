"""mlxfam models and tokenizers follow the mlx-lm protocol: mlx_lm's own generate loop drives them
and picks the same greedy tokens as mlxfam.generate."""

import mlx_lm
import numpy as np
import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper

import mlxfam


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return mlxfam.load(smollm2_gguf, dtype="float32")


def test_mlx_lm_generate_gives_the_same_greedy_tokens(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ours = [r.token for r in mlxfam.stream_generate(model, tokenizer, prompt, max_tokens=12)]
    wrapped = TokenizerWrapper(tokenizer, eos_token_ids=tokenizer.eos_token_ids)
    theirs = [r.token for r in mlx_lm.stream_generate(model, wrapped, prompt, max_tokens=12)]
    assert ours == theirs
    assert mlx_lm.generate(model, wrapped, prompt, max_tokens=12) == mlxfam.generate(
        model, tokenizer, prompt, max_tokens=12
    )
    assert "Paris" in tokenizer.decode(ours)


def test_mlx_lm_wraps_an_mlxfam_tokenizer_as_is(smollm2):
    _, tokenizer = smollm2
    wrapped = TokenizerWrapper(tokenizer)
    assert wrapped.eos_token_ids >= {tokenizer.eos_token_id}
    assert wrapped.encode("Hello world", add_special_tokens=False) == tokenizer.encode(
        "Hello world", add_special_tokens=False
    )
    ids = np.array(tokenizer.encode("The three primary colors are"))
    detok = wrapped.detokenizer
    detok.reset()
    for t in ids:
        detok.add_token(int(t))
    detok.finalize()
    assert detok.text == tokenizer.decode(ids.tolist())
