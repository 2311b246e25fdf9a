"""Weight quantization: which layer gets how many bits, applying that to a model, and mlx-lm's config block.

MLX's affine quantization packs each row of a `Linear` or `Embedding` weight in groups of `group_size`
values along the input dimension, each group with its own scale and bias. A `QuantizationPlan` says
what every layer gets: a default, then rules (shell-style globs over layer paths such as
`model.layers.0.mlp.down_proj` or `lm_head`; a pattern may leave out the leading `model.`) where a
later rule wins over an earlier one. A layer whose input dimension the group size does not divide
is an error naming it (mlx-lm skips such a layer silently; here the plan says so explicitly with a
`PATTERN=none` rule instead). Layers that are already quantized (GGUF blocks, MLX files) stay as
they are.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import MlxfamError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default for affine quantization


@dataclass(frozen=True)
class LayerQuantization:
    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.bits not in BITS:
            raise MlxfamError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise MlxfamError(
                f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}"
            )

    def mlx_lm_entry(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


# (pattern, bits) rules over the default bits. Attention matrices are a small share of a GQA model's
# weights, so 8 bits there costs little; embeddings and head are large, and 6 or 8 bits keep the
# token distribution close.
RECIPES: dict[str, tuple[int, tuple[tuple[str, int], ...]]] = {
    "mixed_4_6": (4, (("*.self_attn.*", 8), ("model.embed_tokens", 6), ("lm_head", 6))),
    "mixed_4_8": (4, (("*.self_attn.*", 8), ("model.embed_tokens", 8), ("lm_head", 8))),
}


@dataclass(frozen=True)
class Rule:
    pattern: str
    quantization: LayerQuantization | None  # None: keep the layer unquantized
    must_match: bool = True  # a user's rule matching no layer is a typo; a recipe's may not apply (tied head)

    def matches(self, path: str) -> bool:
        return fnmatchcase(path, self.pattern) or fnmatchcase(path.removeprefix("model."), self.pattern)


@dataclass(frozen=True)
class QuantizationPlan:
    default: LayerQuantization | None  # layers no rule matches (None: they stay unquantized)
    rules: tuple[Rule, ...] = ()

    def for_layer(self, path: str) -> LayerQuantization | None:
        chosen = self.default
        for rule in self.rules:
            if rule.matches(path):
                chosen = rule.quantization
        return chosen


def parse_layer_spec(spec, where: str, group_size: int = DEFAULT_GROUP_SIZE) -> LayerQuantization | None:
    """`8` / `"8"` (bits, at `group_size`), `"8:32"` (bits:group size), or `"none"` / None (unquantized)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "none"):
        return None
    bits, _, group = str(spec).strip().partition(":")
    try:
        return LayerQuantization(int(bits), int(group) if group else group_size)
    except ValueError:
        raise MlxfamError(f"{where}: {spec!r} is not BITS, BITS:GROUP_SIZE or none") from None


def parse_override(text: str, group_size: int = DEFAULT_GROUP_SIZE) -> Rule:
    """`PATTERN=BITS[:GROUP_SIZE]` or `PATTERN=none`."""
    pattern, sep, spec = text.partition("=")
    if not sep or not pattern.strip():
        raise MlxfamError(f"override {text!r} is not PATTERN=BITS[:GROUP_SIZE] or PATTERN=none")
    return Rule(pattern.strip(), parse_layer_spec(spec, f"override {text!r}", group_size))


def read_recipe_file(path: Path) -> tuple[LayerQuantization | None, list[Rule]]:
    """A JSON recipe: {"bits": 4, "group_size": 64, "overrides": {"PATTERN": 8 | "8:32" | null, ...}}."""
    try:
        recipe = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MlxfamError(f"{path}: not a readable JSON recipe ({e})") from None
    if not isinstance(recipe, dict) or not set(recipe) <= {"bits", "group_size", "overrides"}:
        raise MlxfamError(f"{path}: a recipe is a JSON object with keys bits, group_size, overrides")
    overrides = recipe.get("overrides", {})
    if not isinstance(overrides, dict):
        raise MlxfamError(f"{path}: 'overrides' must map layer patterns to BITS, 'BITS:GROUP_SIZE' or null")
    group = recipe.get("group_size", DEFAULT_GROUP_SIZE)
    default = parse_layer_spec(recipe.get("bits"), f"{path}: bits", group)
    rules = [
        Rule(pattern, parse_layer_spec(spec, f"{path}: override {pattern!r}", group))
        for pattern, spec in overrides.items()
    ]
    return default, rules


def make_plan(
    bits: int | None = None,
    group_size: int | None = None,
    recipe: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> QuantizationPlan | None:
    """The plan for a bit width, a recipe (a name in RECIPES or a JSON file) and `PATTERN=SPEC` overrides;
    None when none of them asks for quantization."""
    if group_size is not None and bits is None and recipe is None and not overrides:
        raise MlxfamError("a group size needs a bit width, a recipe or overrides to apply to")
    rules: list[Rule] = []
    default = None
    if recipe is not None:
        if bits is not None:
            raise MlxfamError(f"give either a bit width or a recipe, not both (recipe {str(recipe)!r} sets the bits)")
        if str(recipe) in RECIPES:
            recipe_bits, recipe_rules = RECIPES[str(recipe)]
            group = group_size or DEFAULT_GROUP_SIZE
            default = LayerQuantization(recipe_bits, group)
            rules += [Rule(pattern, LayerQuantization(b, group), must_match=False) for pattern, b in recipe_rules]
        elif str(recipe).endswith(".json"):
            if group_size is not None:
                raise MlxfamError(f"{recipe}: a recipe file sets its own group size; drop the group size option")
            default, file_rules = read_recipe_file(Path(recipe))
            rules += file_rules
        else:
            raise MlxfamError(f"unknown recipe {str(recipe)!r} (known: {', '.join(RECIPES)}, or a .json file)")
    elif bits is not None:
        default = LayerQuantization(bits, group_size or DEFAULT_GROUP_SIZE)
    rules += [parse_override(text, group_size or DEFAULT_GROUP_SIZE) for text in overrides]
    if default is None and not rules:
        return None
    return QuantizationPlan(default, tuple(rules))


def quantize_model(model: nn.Module, plan: QuantizationPlan) -> None:
    """Quantizes the model's float `Linear`/`Embedding` layers in place as `plan` says (lazily)."""
    layer_paths = [path for path, module in model.named_modules() if _quantizable(module)]
    for rule in plan.rules:
        if rule.must_match and not any(rule.matches(path) for path in layer_paths):
            examples = ", ".join(layer_paths[:2] + layer_paths[-1:])
            raise MlxfamError(f"override pattern {rule.pattern!r} matches no layer (layers are named like {examples})")

    def params_for(path: str, module: nn.Module):
        if not hasattr(module, "to_quantized"):
            return False  # not a weight matrix, or already quantized
        quantization = plan.for_layer(path)
        if quantization is None:
            return False
        shape = tuple(module.weight.shape)
        if shape[-1] % quantization.group_size:
            fitting = [g for g in GROUP_SIZES if shape[-1] % g == 0]
            hint = f"group size {' or '.join(map(str, fitting))}" if fitting else "no group size fits"
            raise MlxfamError(
                f"cannot quantize {path}.weight with shape {shape} at group size {quantization.group_size}: "
                f"{shape[-1]} is not a multiple of it ({hint}; or keep the layer unquantized with '{path}=none')"
            )
        return {"group_size": quantization.group_size, "bits": quantization.bits}

    nn.quantize(model, class_predicate=params_for)


def _quantizable(module: nn.Module) -> bool:
    return hasattr(module, "to_quantized") or is_quantized(module)


def is_quantized(module: nn.Module) -> bool:
    """A quantized layer of any kind (MLX's QuantizedLinear/QuantizedEmbedding, a family's own)."""
    return isinstance(module.get("scales"), mx.array) and hasattr(module, "bits")


def dequantize_model(model: nn.Module) -> None:
    """Replaces every quantized layer with its float equivalent (weights in the scales' dtype), in place."""
    replaced = []
    for path, module in model.named_modules():
        if not is_quantized(module):
            continue
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            raise MlxfamError(f"{path}: cannot dequantize a {type(module).__name__}")
        weight = mx.dequantize(module.weight, module.scales, module.biases, module.group_size, module.bits)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*weight.shape)
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = weight
        replaced.append((path, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))


def quantized_layers(model: nn.Module) -> dict[str, LayerQuantization]:
    return {
        path: LayerQuantization(module.bits, module.group_size)
        for path, module in model.named_modules()
        if is_quantized(module)
    }


def mlx_lm_config(model: nn.Module, default: LayerQuantization | None = None) -> dict | None:
    """mlx-lm's `quantization` block for the model as it is: a default group size and bit width, plus an
    entry {"group_size", "bits", "mode"} for each quantized layer that differs from it. `default`: the one
    to write if any layer has it (else the most common). None when nothing is quantized."""
    layers = quantized_layers(model)
    if not layers:
        return None
    if default not in layers.values():
        default = Counter(layers.values()).most_common(1)[0][0]
    config = default.mlx_lm_entry()
    for path, quantization in sorted(layers.items(), key=lambda item: _natural_key(item[0])):
        if quantization != default:
            config[path] = quantization.mlx_lm_entry()
    return config


def _natural_key(path: str) -> list[tuple]:
    """Layer paths in model order: model.layers.2 before model.layers.10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.split(".")]


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits (packed weights, scales, biases, float tensors) per model weight, as mlx-lm counts them."""
    weights = 0
    for _, module in model.named_modules():
        bits = module.bits if is_quantized(module) else None
        for name, value in module.items():
            # Underscored arrays are buffers (rotary tables), not parameters.
            if isinstance(value, mx.array) and not name.startswith("_") and not (bits and name in ("scales", "biases")):
                weights += value.size * 32 // bits if bits and name == "weight" else value.size
    total_bits = sum(value.nbytes * 8 for _, value in tree_flatten(model.parameters()))
    return total_bits / weights
