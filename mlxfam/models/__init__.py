"""The family registry: config.json -> the family that loads it."""

from __future__ import annotations

from ..errors import MlxfamError
from . import (
    baichuan,
    chatglm,
    chatglm2,
    gemma,
    gemma2,
    gemma3,
    gpt2,
    internlm,
    internlm2,
    llama,
    minicpm,
    mixtral,
    qwen,
    qwen2,
)
from .family import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    gemma.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    gpt2.FAMILY,
    baichuan.FAMILY,
    minicpm.FAMILY,
    mixtral.FAMILY,
    qwen.FAMILY,
    qwen2.FAMILY,
    internlm.FAMILY,
    internlm2.FAMILY,
    chatglm.FAMILY,
    chatglm2.FAMILY,
)


def family_for(hf_config: dict, source: str = "config.json") -> Family:
    """Dispatch on `architectures` first (it is what the checkpoint was saved as), then `model_type`."""
    architectures = hf_config.get("architectures") or []
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures) and family.matches(hf_config):
            return family
    model_type = hf_config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types and family.matches(hf_config):
            return family
    known_archs = sorted(a for f in FAMILIES for a in f.architectures)
    known_types = sorted(t for f in FAMILIES for t in f.model_types)
    raise MlxfamError(
        f"{source}: unknown architecture {architectures or None} / model_type {model_type!r}. "
        f"Known architectures: {', '.join(known_archs)}; known model_type values: {', '.join(known_types)}"
    )
