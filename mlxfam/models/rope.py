"""Rotary position embeddings and the frequency scalings real checkpoints ask for.

A family describes its rotary embedding with a `RopeConfig`; `RotaryEmbedding` turns it into
inverse frequencies once (or per length, for dynamic NTK) and applies them through the kernels'
seam (`mlxfam.kernels.rope`: q and k in one launch on Metal/CUDA, MLX ops elsewhere).
The scaling formulas follow transformers' `modeling_rope_utils.py`, which is what the HF
configs (`rope_scaling` / `rope_parameters`) are written against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import MlxfamError
from ..kernels.rope import rope, rope_qk, rope_table

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    dims: int  # rotated dimensions per head (the rest pass through)
    base: float = 10000.0
    traditional: bool = False  # True: pairs (2i, 2i+1); False: HF rotate_half pairs (i, i + dims/2)
    rope_type: str = "default"
    scaling: dict = field(default_factory=dict)  # the scaling's own parameters (factor, ...)
    max_position_embeddings: int | None = None
    freq_factors: tuple[float, ...] | None = None  # GGUF `rope_freqs`: inv_freq_i is divided by these

    @staticmethod
    def from_hf(hf: dict, dims: int, base: float) -> RopeConfig:
        """Reads `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5), and the
        per-frequency divisors a GGUF's `rope_freqs` tensor carries (see gguf.py)."""
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        base = float(params.pop("rope_theta", base))
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type not in ROPE_TYPES:
            raise MlxfamError(
                f"config.json: rope scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if rope_type != "default" and "factor" not in params:
            raise MlxfamError(f"config.json: rope scaling {rope_type!r} needs a 'factor'")
        return RopeConfig(
            dims=dims,
            base=base,
            rope_type=rope_type,
            scaling=params,
            max_position_embeddings=hf.get("max_position_embeddings"),
            freq_factors=tuple(hf["rope_freq_factors"]) if hf.get("rope_freq_factors") else None,
        )


def default_inv_freq(dims: int, base: float) -> np.ndarray:
    return 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)


def _llama3_inv_freq(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low_ff, high_ff = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > orig / low_ff, inv_freq / factor, inv_freq)
    in_between = (wavelen >= orig / high_ff) & (wavelen <= orig / low_ff)
    return np.where(in_between, smoothed, out)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(dims: int, base: float, s: dict, max_pos: int | None) -> tuple[np.ndarray, float]:
    factor = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = s.get("beta_fast", 32.0), s.get("beta_slow", 1.0)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dims // 2) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = default_inv_freq(dims, base)
    inv_freq = (inv / factor) * (1 - extrapolation) + inv * extrapolation

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = _yarn_mscale(factor, s["mscale"]) / _yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Applies the configured rotary embedding to `(B, heads, L, head_dim)` at a position offset."""

    def __init__(self, cfg: RopeConfig):
        super().__init__()
        self.cfg = cfg
        self._attention_factor = 1.0
        s = cfg.scaling
        if cfg.rope_type == "yarn":
            inv_freq, self._attention_factor = _yarn(cfg.dims, cfg.base, s, cfg.max_position_embeddings)
        else:
            inv_freq = default_inv_freq(cfg.dims, cfg.base)
            if cfg.rope_type == "linear":
                inv_freq = inv_freq / s["factor"]
            elif cfg.rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, s)
        if cfg.freq_factors is not None:
            inv_freq = inv_freq / np.asarray(cfg.freq_factors, dtype=np.float64)
        self._inv_freq = mx.array(inv_freq.astype(np.float32))  # private: not a loadable parameter

    def _dynamic_inv_freq(self, total_len: int) -> mx.array:
        """HF dynamic NTK: past the trained length the base grows with the current total length."""
        max_pos = self.cfg.scaling.get("original_max_position_embeddings") or self.cfg.max_position_embeddings
        if total_len <= max_pos:
            return self._inv_freq
        factor, d = self.cfg.scaling["factor"], self.cfg.dims
        base = self.cfg.base * ((factor * total_len / max_pos) - (factor - 1)) ** (d / (d - 2))
        return mx.array(default_inv_freq(d, base).astype(np.float32))

    def inv_freq(self, total_len: int) -> mx.array:
        """The inverse frequencies while the sequence holds `total_len` tokens (only dynamic NTK depends on it)."""
        return self._dynamic_inv_freq(total_len) if self.cfg.rope_type == "dynamic" else self._inv_freq

    def tables(self, positions: mx.array, total_len: int) -> tuple[mx.array, mx.array]:
        """cos/sin of `positions` (B or 1, L); yarn's attention factor scales the rotated dims."""
        return rope_table(positions, self.inv_freq(total_len), scale=self._attention_factor)

    def _tables_from(self, offset: int, length: int) -> tuple[mx.array, mx.array]:
        return self.tables(mx.arange(offset, offset + length)[None], offset + length)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        """`(B, heads, L, head_dim)` rotated at positions offset.. offset+L-1."""
        cos, sin = self._tables_from(offset, x.shape[-2])
        return rope(x, cos, sin, rotary_dims=self.cfg.dims, interleaved=self.cfg.traditional)

    def rotate_qk(self, q: mx.array, k: mx.array, offset: int = 0) -> tuple[mx.array, mx.array]:
        """Queries and keys rotated at positions offset.., in one launch."""
        cos, sin = self._tables_from(offset, q.shape[-2])
        return rope_qk(q, k, cos, sin, rotary_dims=self.cfg.dims, interleaved=self.cfg.traditional)

    def _extra_repr(self) -> str:
        return f"dims={self.cfg.dims}, base={self.cfg.base:g}, type={self.cfg.rope_type}"
