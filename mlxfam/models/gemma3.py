"""Gemma 3 (270M / 1B text models; the text part of the 4B / 12B / 27B multimodal checkpoints): Gemma 2's
layer with (1+w) fp32 RMSNorms on each head's queries and keys instead of the softcaps (unless a config sets
them), local (sliding-window) layers in a pattern with one global layer every `sliding_window_pattern`, and a
rotary base per kind of layer: `rope_local_base_freq` on local layers, `rope_theta` with the checkpoint's
scaling (linear x8 on 4B+) on global ones. Local layers keep only their window in a rotating cache.

A multimodal checkpoint (`Gemma3ForConditionalGeneration`) nests the text config under `text_config` and
its tensors under `language_model.model.` (the original release; transformers 5 saves `model.language_model.`);
its vision tower and projector are not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..chat_formats import ChatFormat, rounds, split_system
from ..errors import MlxfamError
from .base import CausalLM, DecoderModel, ModelConfig, require
from .family import Family, TokenizerRules, Traits
from .gemma2 import Gemma2DecoderLayer, gemma2_config
from .llama import sanitize as llama_sanitize
from .rope import RopeConfig

# transformers' Gemma3TextConfig defaults: the released multimodal configs leave these out of text_config.
_DEFAULTS = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
}
_LOCAL, _GLOBAL = "sliding_attention", "full_attention"


@dataclass(frozen=True)
class Gemma3Config(ModelConfig):
    local_rope: RopeConfig | None = None  # the local layers' rotary; `rope` is the global layers'


def _rope_parameters(text: dict) -> dict[str, dict]:
    """Each layer kind's rope parameters. transformers 5 writes `rope_parameters` per layer kind; the released
    configs write `rope_theta` and `rope_scaling` (global layers) and `rope_local_base_freq`."""
    params = text.get("rope_parameters") or {}
    if params and set(params) <= {_LOCAL, _GLOBAL}:
        return {
            _GLOBAL: {"rope_theta": text["rope_theta"], **(params.get(_GLOBAL) or {})},
            _LOCAL: {"rope_theta": text["rope_local_base_freq"], **(params.get(_LOCAL) or {})},
        }
    return {
        _GLOBAL: {**(text.get("rope_scaling") or params), "rope_theta": params.get("rope_theta", text["rope_theta"])},
        _LOCAL: {"rope_type": "default", "rope_theta": text["rope_local_base_freq"]},
    }


def gemma3_config(hf: dict) -> Gemma3Config:
    text = {**_DEFAULTS, **(hf.get("text_config") or hf)}
    if "tie_word_embeddings" in hf:  # the multimodal config ties the head at its top level
        text.setdefault("tie_word_embeddings", hf["tie_word_embeddings"])
    layers = require(text, "num_hidden_layers")
    pattern = text["sliding_window_pattern"]
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise MlxfamError(f"config.json: sliding_window_pattern {pattern!r} must be an integer >= 1")
    # transformers' rule: layer i is global when (i + 1) % sliding_window_pattern == 0.
    layer_types = text.get("layer_types") or [_LOCAL if (i + 1) % pattern else _GLOBAL for i in range(layers)]
    rope = _rope_parameters(text)
    plain = {k: v for k, v in text.items() if k not in ("rope_scaling", "rope_parameters")}
    cfg = gemma2_config(
        {
            **plain,
            "layer_types": layer_types,
            "rope_parameters": rope[_GLOBAL],
            # Gemma 3 has no softcaps unless its config sets them (gemma2_config would default them on).
            "attn_logit_softcapping": text.get("attn_logit_softcapping"),
            "final_logit_softcapping": text.get("final_logit_softcapping"),
        }
    )
    local = RopeConfig.from_hf({**plain, "rope_parameters": rope[_LOCAL]}, cfg.head_dim, rope[_LOCAL]["rope_theta"])
    return Gemma3Config(**{**vars(cfg), "qk_norm": True}, local_rope=local)


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    """Gemma 2's block; a local layer rotates with the local rope."""

    def __init__(self, cfg: Gemma3Config, layer_idx: int):
        local = cfg.sliding_windows[layer_idx] is not None
        super().__init__(replace(cfg, rope=cfg.local_rope) if local else cfg, layer_idx)


class Gemma3ForCausalLM(CausalLM):
    window_caches = True  # a local layer's cache keeps only its window

    def __init__(self, cfg: Gemma3Config):
        super().__init__(cfg, DecoderModel(cfg, Gemma3DecoderLayer))


# A multimodal checkpoint's text tensors: the original release's names, then transformers 5's.
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
)
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def sanitize(weights: dict, cfg: ModelConfig) -> dict:
    text = {}
    for name, tensor in weights.items():
        if name.startswith(_NOT_TEXT):
            continue
        for old, new in _TEXT_PREFIXES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        text[name] = tensor
    return llama_sanitize(text, cfg)


def _gemma3_chat(tokenizer, messages, add_generation_prompt) -> str:
    """Gemma 3's template: "<start_of_turn>{user|model}\\n{text}<end_of_turn>\\n" per turn (texts stripped), a
    leading system message folded into the first turn as its text + "\\n\\n", "<start_of_turn>model\\n" to open
    the reply, and one BOS (written here only when the tokenizer does not add it)."""
    system, turns = split_system(messages, "Gemma 3", ("user", "assistant"))
    rounds(turns, "Gemma 3")  # the template's rule: user and assistant alternate from a user turn
    text = "" if tokenizer.add_bos_token else tokenizer.bos_token or ""
    for i, message in enumerate(turns):
        role = "model" if message["role"] == "assistant" else "user"
        prefix = system + "\n\n" if i == 0 and system is not None else ""
        text += f"<start_of_turn>{role}\n{prefix}{message['content'].strip()}<end_of_turn>\n"
    return text + "<start_of_turn>model\n" if add_generation_prompt else text


CHAT_FORMAT = ChatFormat("gemma3", _gemma3_chat)

FAMILY = Family(
    name="gemma3",
    description="Gemma 3 (270M, 1B; the text part of 4B, 12B, 27B)",
    model_types=("gemma3_text", "gemma3"),
    architectures=("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
    config=gemma3_config,
    model_class=Gemma3ForCausalLM,
    sanitize=sanitize,
    tokenizer=TokenizerRules(chat_format=CHAT_FORMAT, stop_tokens=("<end_of_turn>",)),
    traits=Traits(
        norm="RMSNorm (1+w), fp32; 4 per layer; q/k norms",
        activation="GeGLU (tanh GELU)",
        positions="RoPE half-split; local base 1e4, global 1e6 (+ linear x8 on 4B+)",
        attention="GQA; 5 local (window) : 1 global; local layers rotating caches",
        head="tied",
        scalings="embeddings x sqrt(hidden); query_pre_attn_scalar",
    ),
)
