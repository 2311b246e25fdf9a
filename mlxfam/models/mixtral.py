"""Mixtral: Mistral with a sparse mixture of SwiGLU experts in place of the MLP.

The per-expert w1 (gate) / w3 (up) / w2 (down) tensors are stacked at load into one `[E, out, in]`
weight per projection, and the experts every token picked run as one `mx.gather_mm`. Module names
follow mlx-lm (`block_sparse_moe.gate`, `block_sparse_moe.switch_mlp.{gate,up,down}_proj`), so
checkpoints mlx-lm converted (also quantized) load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import MlxfamError
from .base import ACTIVATIONS, CausalLM, DecoderLayer, DecoderModel, ModelConfig, require
from .family import Family, Traits
from .llama import llama_config
from .llama import sanitize as llama_sanitize

# From this many (token, expert) pairs on, rows are sorted by expert so each expert's weight is read once.
SORT_THRESHOLD = 64


@dataclass(frozen=True)
class MixtralConfig(ModelConfig):
    num_experts: int = 8
    experts_per_token: int = 2


def mixtral_config(hf: dict) -> MixtralConfig:
    experts, per_token = require(hf, "num_local_experts"), require(hf, "num_experts_per_tok")
    if not 0 < per_token <= experts:
        raise MlxfamError(
            f"config.json: num_experts_per_tok ({per_token}) must be between 1 and num_local_experts ({experts})"
        )
    # sliding_window null: full attention; otherwise every layer slides, as in Mistral.
    llama = llama_config(hf, sliding_windows=(hf.get("sliding_window"),) * require(hf, "num_hidden_layers"))
    return MixtralConfig(**vars(llama), num_experts=experts, experts_per_token=per_token)


def gather_matmul(x: mx.array, weight: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
    """`x @ weight[e].T` for the experts `indices` pick, with `mx.gather_mm`.

    MLX's CPU backend runs gather_mm in float32 only, so there other dtypes go through float32:
    a few (token, expert) pairs (decoding) convert just the experts they use, many (prefill) the stack once.
    """
    if weight.dtype == mx.float32 or mx.default_device().type != mx.cpu:
        return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
    if indices.size < weight.shape[0]:
        weight = mx.take(weight, indices.flatten(), axis=0)
        indices = mx.arange(indices.size).reshape(indices.shape)
    weight = weight.astype(mx.float32).swapaxes(-1, -2)
    out = mx.gather_mm(x.astype(mx.float32), weight, rhs_indices=indices, sorted_indices=sorted_indices)
    return out.astype(x.dtype)


class SwitchLinear(nn.Module):
    """One bias-free linear per expert, stacked as `weight [E, out, in]`; `indices` pick each row's experts."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return gather_matmul(x, self.weight, indices, sorted_indices)

    def to_quantized(self, group_size: int | None = None, bits: int | None = None, mode: str = "affine"):
        """What `nn.quantize` swaps in for this layer."""
        return QuantizedSwitchLinear(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, weight: mx.array, group_size: int | None, bits: int | None, mode: str):
        super().__init__()
        input_dims = weight.shape[-1]
        self.mode = mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        # Read back, so the mode's defaults are filled in.
        self.group_size = input_dims // self.scales.shape[-1]
        self.bits = self.weight.shape[-1] * 32 // input_dims
        self.freeze()

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """down_e(act(gate_e(x)) * up_e(x)) for each of a token's selected experts e."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        hidden, inner, experts = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        self.gate_proj = SwitchLinear(hidden, inner, experts)
        self.up_proj = SwitchLinear(hidden, inner, experts)
        self.down_proj = SwitchLinear(inner, hidden, experts)
        self.activation = ACTIVATIONS[cfg.activation]

    def _experts(self, x: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        h = self.activation(self.gate_proj(x, indices, sorted_indices)) * self.up_proj(x, indices, sorted_indices)
        return self.down_proj(h, indices, sorted_indices)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x `(..., D)`, indices `(..., k)` -> each selected expert's output `(..., k, D)`."""
        k = indices.shape[-1]
        if indices.size < SORT_THRESHOLD:
            # Rows (..., 1, 1, D) broadcast against the k experts each: one (1, D) matrix per pair.
            return self._experts(x[..., None, None, :], indices, False).squeeze(-2)
        flat = indices.flatten()
        order = mx.argsort(flat)
        rows = x.reshape(-1, 1, x.shape[-1])[order // k]
        out = self._experts(rows, flat[order], True)
        return out[mx.argsort(order)].reshape(*indices.shape, -1)


class SparseMoE(nn.Module):
    """Router picks the top-k experts per token; their outputs are mixed by a softmax over the k logits
    (the same as a softmax over all experts renormalised over the k)."""

    def __init__(self, cfg: MixtralConfig):
        super().__init__()
        self.experts_per_token = cfg.experts_per_token
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(cfg)

    def __call__(self, x: mx.array) -> mx.array:
        k = self.experts_per_token
        router_logits = self.gate(x)
        indices = mx.argpartition(-router_logits, kth=k - 1, axis=-1)[..., :k]
        selected = mx.take_along_axis(router_logits, indices, axis=-1).astype(mx.float32)
        weights = mx.softmax(selected, axis=-1).astype(x.dtype)
        return (self.switch_mlp(x, indices) * weights[..., None]).sum(axis=-2)


class MixtralDecoderLayer(DecoderLayer):
    mlp_class = SparseMoE

    def __init__(self, cfg: MixtralConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.block_sparse_moe = self.pop("mlp")  # the checkpoints' (and mlx-lm's) name for it

    def __call__(self, x: mx.array, mask, cache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.block_sparse_moe(self.post_attention_layernorm(h))


class MixtralForCausalLM(CausalLM):
    def __init__(self, cfg: MixtralConfig):
        super().__init__(cfg, DecoderModel(cfg, MixtralDecoderLayer))


_EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def sanitize(weights: dict, cfg: MixtralConfig) -> dict:
    out = llama_sanitize(weights, cfg)
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        for original, ours in _EXPERT_PROJECTIONS.items():
            names = [f"{prefix}.experts.{e}.{original}.weight" for e in range(cfg.num_experts)]
            present = [name for name in names if name in out]
            if not present:
                continue  # already stacked (an mlx-lm conversion)
            if len(present) < len(names):
                missing = sorted(set(names) - set(present))
                raise MlxfamError(f"missing expert tensor(s): {', '.join(missing)}")
            out[f"{prefix}.switch_mlp.{ours}.weight"] = mx.stack([out.pop(name) for name in names])
    return out


FAMILY = Family(
    name="mixtral",
    description="Mixtral 8x7B, 8x22B",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    config=mixtral_config,
    model_class=MixtralForCausalLM,
    sanitize=sanitize,
    traits=Traits(
        activation="SwiGLU experts, top-k router",
        attention="GQA; sliding window if set",
    ),
)
