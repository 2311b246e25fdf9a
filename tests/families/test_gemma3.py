"""Gemma 3 against the logits of transformers' own Gemma 3 code (tests/data/golden/gemma3*, made by
tests/fixtures/make_golden.py): the fixtures exercise each quirk, the text part of a multimodal checkpoint
loads under the names real checkpoints ship, local layers keep rotating caches, a saved chat resumes in a new
process, and the chat format equals the official template's text."""

import json
import subprocess
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from golden import FP32_TOLERANCE, GOLDEN, fixture, max_error
from mlxfam_apps.cli import main

import mlxfam
from mlxfam.cache import KVCache, RotatingKVCache
from mlxfam.chat_template import render_chat_template
from mlxfam.errors import MlxfamError
from mlxfam.loader import build_model
from mlxfam.models.gemma3 import CHAT_FORMAT

LOCAL, GLOBAL = "sliding_attention", "full_attention"


@pytest.mark.parametrize("variant", ["gemma3", "gemma3_multimodal"])
def test_gemma3_fixtures_slide_past_the_window_on_local_and_global_layers(variant):
    """The prompt is longer than the window, and both kinds of layer occur (a local one after the global one)."""
    config, _, golden = fixture(variant)
    text = config.get("text_config", config)
    assert golden["input_ids"].shape[1] > text["sliding_window"]
    model, _ = mlxfam.load(GOLDEN / variant, dtype="float32")
    assert [w is not None for w in model.config.sliding_windows] == [True, True, False, True]


def test_gemma3_multimodal_fixture_is_the_text_fixture_renamed():
    _, text_weights, text_golden = fixture("gemma3")
    _, weights, golden = fixture("gemma3_multimodal")
    assert {f"language_model.{name}" for name in text_weights} < set(weights)
    assert any(name.startswith("vision_tower.") for name in weights)
    assert any(name.startswith("multi_modal_projector.") for name in weights)
    for name in golden:
        np.testing.assert_array_equal(golden[name], text_golden[name])


@pytest.mark.parametrize(
    "change",
    [
        {"rope_local_base_freq": 1_000_000.0},
        {"rope_scaling": None},
        {"sliding_window_pattern": 1},
        {"query_pre_attn_scalar": 32},
    ],
    ids=["global base on local layers", "no global scaling", "no local layers", "head_dim scale"],
)
def test_gemma3_each_quirk_is_needed_to_match_the_reference(change):
    """A model without one of them misses the reference by far more than the fp32 tolerance."""
    config, weights, golden = fixture("gemma3")
    assert max_error({**config, **change}, weights, golden) > 100 * FP32_TOLERANCE


def test_gemma3_without_qk_norms_misses_the_reference():
    config, weights, golden = fixture("gemma3")
    unit = {
        name: mx.zeros_like(w) if name.endswith(("q_norm.weight", "k_norm.weight")) else w
        for name, w in weights.items()
    }
    assert max_error(config, unit, golden) > 100 * FP32_TOLERANCE


def test_gemma3_transformers5_spellings_load_the_same_model():
    """transformers 5 saves the text model under model.language_model. and writes rope_parameters per layer
    kind and layer_types instead of the released rope_theta / rope_scaling / rope_local_base_freq / pattern."""
    config, weights, golden = fixture("gemma3_multimodal")
    text = dict(config["text_config"])
    del text["rope_scaling"]
    text["rope_parameters"] = {
        GLOBAL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        LOCAL: {"rope_type": "default", "rope_theta": 10_000.0},
    }
    renamed = {name.replace("language_model.model.", "model.language_model."): w for name, w in weights.items()}
    renamed = {
        f"model.{n}" if n.startswith(("vision_tower.", "multi_modal_projector.")) else n: w for n, w in renamed.items()
    }
    assert max_error({**config, "text_config": text}, renamed, golden) < FP32_TOLERANCE


def test_gemma3_softcaps_apply_only_when_the_config_sets_them():
    config, weights, golden = fixture("gemma3")
    assert config["attn_logit_softcapping"] is None and config["final_logit_softcapping"] is None
    assert max_error({**config, "final_logit_softcapping": 2.0}, weights, golden) > 100 * FP32_TOLERANCE


def test_gemma3_refuses_a_bad_sliding_window_pattern():
    config, weights, _ = fixture("gemma3")
    with pytest.raises(MlxfamError, match="sliding_window_pattern 0"):
        build_model({**config, "sliding_window_pattern": 0}, weights)


def test_gemma3_local_layers_keep_rotating_caches_of_their_window():
    model, _ = mlxfam.load(GOLDEN / "gemma3", dtype="float32")
    window = model.config.sliding_windows[0]
    cache = model.make_cache()
    assert [type(c) for c in cache] == [RotatingKVCache, RotatingKVCache, KVCache, RotatingKVCache]
    assert all(c.max_size == window and c.keep == 0 for c in cache if isinstance(c, RotatingKVCache))
    # A max_kv_size tighter than the window bounds the local layers as it does the global one.
    assert {c.max_size for c in model.make_cache(max_kv_size=3, keep=1)} == {3}
    assert [c.max_size for c in model.make_cache(max_kv_size=8, keep=2)] == [window, window, 8, window]


def test_gemma3_row_in_mlxfam_families(capsys):
    assert main(["families"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gemma3 "))
    assert "q/k norms" in row and "local base 1e4" in row


# A Gemma 3 chat's prompt cache: saved here, loaded in a new process as `mlxfam chat` does (with its cache
# settings) or without settings, the next token's logits bit for bit the same.
RESUME = """
import json, sys
import mlx.core as mx, numpy as np
import mlxfam
model_dir, cache_file, settings, token, out = sys.argv[1:]
model, _ = mlxfam.load(model_dir, dtype="float32")
cache, metadata = mlxfam.load_prompt_cache(cache_file, model, **json.loads(settings))
np.save(out, np.array(model(mx.array([[int(token)]]), cache=cache)))
print(json.dumps({"metadata": metadata, "offsets": [layer.offset for layer in cache]}))
"""
CHAT_CACHE_SETTINGS = {"max_kv_size": None, "kv_bits": None, "kv_group_size": 64, "quantized_kv_start": 0}


def resume_in_a_new_process(tmp_path, settings: dict):
    model, _ = mlxfam.load(GOLDEN / "gemma3", dtype="float32")
    golden = np.load(GOLDEN / "gemma3" / "golden.npz")
    cache = model.make_cache()
    model(mx.array(golden["input_ids"], dtype=mx.int32), cache=cache)
    model(mx.array([[int(golden["decode_ids"][0])]]), cache=cache)  # the local layers' caches write a slot in place
    path = tmp_path / "chat.cache"
    mlxfam.save_prompt_cache(path, cache, model, metadata={"chat": "hi"})
    here = np.array(model(mx.array([[int(golden["decode_ids"][1])]]), cache=cache))
    out = tmp_path / "logits.npy"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RESUME,
            str(GOLDEN / "gemma3"),
            str(path),
            json.dumps(settings),
            str(golden["decode_ids"][1]),
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"metadata": {"chat": "hi"}, "offsets": [14] * 4}  # after the resumed step
    np.testing.assert_array_equal(np.load(out), here)
    np.testing.assert_allclose(here[0, -1], golden["decode_logits"][1], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def test_gemma3_prompt_cache_resumes_in_a_new_process(tmp_path):
    resume_in_a_new_process(tmp_path, {})


def test_gemma3_prompt_cache_resumes_with_the_chat_apps_settings(tmp_path):
    resume_in_a_new_process(tmp_path, CHAT_CACHE_SETTINGS)


# The chat template of google/gemma-3-*-it (tokenizer_config.json), verbatim.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  What is 2+2?\n"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Bonjour ! "},
        {"role": "user", "content": "How are you?"},
    ],
    [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "No."}],
    [{"role": "system", "content": "Only a system prompt."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tokenizer_adds_bos", [True, False])
def test_gemma3_chat_format_equals_the_official_template(messages, add_generation_prompt, tokenizer_adds_bos):
    """The prompt text (with the BOS the tokenizer adds when it adds one) is the official template's."""
    tokenizer = SimpleNamespace(add_bos_token=tokenizer_adds_bos, bos_token="<bos>")
    text = CHAT_FORMAT(tokenizer, messages, add_generation_prompt)
    expected = render_chat_template(
        GEMMA3_TEMPLATE, messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>"
    )
    assert ("<bos>" if tokenizer_adds_bos else "") + text == expected


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "I start."}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    ],
)
def test_gemma3_chat_format_refuses_what_the_template_refuses(messages):
    with pytest.raises(MlxfamError, match="Conversation roles must alternate"):
        render_chat_template(GEMMA3_TEMPLATE, messages, add_generation_prompt=True, bos_token="<bos>")
    with pytest.raises(MlxfamError, match="alternating from a user turn"):
        CHAT_FORMAT(SimpleNamespace(add_bos_token=True, bos_token="<bos>"), messages, True)
