"""KV caches. A model makes one per layer with `model.make_cache(...)` (see `make_kv_cache`).

Two slot policies:

- `KVCache` (standard) holds every token in order. Its buffers grow in steps of `step` slots
  and new keys/values are written in place, so decoding does not copy the whole cache each token.
- `RotatingKVCache` holds at most `max_size` slots: the first `keep` tokens stay and the rest is
  a window of the latest tokens (see the class).

Either stores keys and values as plain `(B, kv_heads, slots, head_dim)` arrays in the model's
dtype, or, with `bits` set, quantized (`QuantizedKV`). With `quantized_kv_start` N > 0 a
quantizing cache stores plain arrays until it holds N tokens; its next update then quantizes what
it holds and everything after is stored quantized.

Packed layout of a `QuantizedKV` (what `mlxfam.attention` reads with `mx.quantized_matmul`, and
what a kernel may read directly). MLX's affine quantization, one scale and bias per head, per slot
and per group of `group_size` consecutive head_dim elements; keys and values are packed separately:

    data    uint32          (B, kv_heads, slots, head_dim * bits // 32)
    scales  keys' dtype     (B, kv_heads, slots, head_dim // group_size)
    biases  keys' dtype     (B, kv_heads, slots, head_dim // group_size)

Element d of head h at slot s is  scales[b, h, s, g] * q + biases[b, h, s, g]  with g = d // group_size
and q the unsigned `bits`-bit integer at bit offset (d * bits) % 32 of word data[b, h, s, d * bits // 32]:
a word holds 32 // bits elements, the lowest-numbered one in its lowest bits (little-endian nibbles or
bytes). A scale may be negative (MLX anchors the bias at the group's edge of larger magnitude). bits
is 4 or 8 and group_size 32 or 64, so groups never straddle words. Slots: a standard cache fills
slots 0..offset-1 in token order (its buffers hold a multiple of `step` slots; the rest is unused);
a rotating cache fills slots 0..len(slot_positions)-1 (of `max_size`) in no particular order,
`slot_positions[s]` being the absolute position of slot s. `update_and_fetch` hands back the filled
slots only (for a multi-token step of a rotating cache: its filled slots, then the new tokens).
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .errors import MlxfamError

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64)
PACKED_PARTS = ("data", "scales", "biases")


class NotAPlainArray(MlxfamError, AttributeError):
    """Quantized keys/values reached code that reads cached keys as a plain array (an AttributeError
    too, so `hasattr` still answers)."""


class QuantizedKV(NamedTuple):
    """Keys or values of a quantizing cache, packed as the module docstring describes."""

    data: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def arrays(self) -> tuple[mx.array, mx.array, mx.array]:
        return self.data, self.scales, self.biases

    def __getattr__(self, name: str):
        # Reached only for what a QuantizedKV lacks: a family that reworks the keys a cache hands back
        # (InternLM's dynamic rotary re-rotates them every step) cannot read them packed.
        raise NotAPlainArray(
            f"this model reads its cached keys and values as plain arrays (.{name}), which a quantized "
            "KV cache does not hand back: kv_bits is not supported for it"
        )


def slot_count(x: mx.array | QuantizedKV) -> int:
    return (x.data if isinstance(x, QuantizedKV) else x).shape[2]


def _each_part(fn, *xs):
    """`fn` on plain arrays, or on each packed array of QuantizedKVs (all share the slot axis 2)."""
    if isinstance(xs[0], QuantizedKV):
        parts = [fn(*same_part) for same_part in zip(*(x.arrays for x in xs))]
        return QuantizedKV(*parts, xs[0].group_size, xs[0].bits)
    return fn(*xs)


def _arrays(x: mx.array | QuantizedKV | None) -> list[mx.array]:
    if x is None:
        return []
    return list(x.arrays) if isinstance(x, QuantizedKV) else [x]


def _write(buffer: mx.array, start: int, new: mx.array) -> mx.array:
    buffer[..., start : start + new.shape[2], :] = new
    return buffer


def _zeros_like_slots(x: mx.array, slots: int) -> mx.array:
    return mx.zeros((*x.shape[:2], slots, x.shape[-1]), x.dtype)


def attention_mask(query_len: int, offset: int, window: int | None) -> mx.array | str | None:
    """Mask for `query_len` queries at absolute positions offset.. over keys 0..offset+query_len-1."""
    key_len = offset + query_len
    if window is None or window >= key_len:
        return "causal" if query_len > 1 else None
    query_pos = mx.arange(offset, key_len)[:, None]
    key_pos = mx.arange(key_len)[None]
    return (key_pos <= query_pos) & (key_pos > query_pos - window)


def check_integer(name: str, value, minimum: int) -> None:
    """Raises MlxfamError naming `name` unless `value` is an int >= `minimum` (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MlxfamError(f"{name} must be an integer >= {minimum}, got {value!r}")


def cache_settings(
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    max_kv_size: int | None = None,
    keep: int = 4,
    quantized_kv_start: int = 0,
    head_dim: int | None = None,
) -> dict:
    """Checks the cache options (`head_dim`: the model's, when known) and returns the ones that
    matter, normalised: `make_kv_cache(**settings)` rebuilds the same kind of cache."""
    if kv_bits is not None and (isinstance(kv_bits, bool) or kv_bits not in KV_BITS):
        raise MlxfamError(f"kv_bits must be 4 or 8 (or None for an unquantized cache), got {kv_bits!r}")
    if isinstance(kv_group_size, bool) or kv_group_size not in KV_GROUP_SIZES:
        raise MlxfamError(f"kv_group_size must be 32 or 64, got {kv_group_size!r}")
    check_integer("quantized_kv_start", quantized_kv_start, minimum=0)
    if max_kv_size is not None:
        check_integer("max_kv_size", max_kv_size, minimum=1)
        check_integer("keep", keep, minimum=0)
        if max_kv_size <= keep:
            raise MlxfamError(f"max_kv_size ({max_kv_size}) must be larger than keep ({keep})")
    if kv_bits is not None and head_dim is not None and head_dim % kv_group_size:
        raise MlxfamError(
            f"kv_group_size {kv_group_size} does not divide the model's head_dim {head_dim}, "
            "so its keys and values cannot be quantized in groups of that size"
        )
    settings: dict = {"kv_bits": kv_bits, "max_kv_size": max_kv_size}
    if kv_bits is not None:
        settings.update(kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start)
    if max_kv_size is not None:
        settings["keep"] = keep
    return settings


def make_kv_cache(num_layers: int, head_dim: int | None = None, **options) -> list:
    """One cache per layer from the `cache_settings` options, checked first."""
    settings = cache_settings(head_dim=head_dim, **options)
    quantization = {}
    if settings["kv_bits"] is not None:
        quantization = {
            "bits": settings["kv_bits"],
            "group_size": settings["kv_group_size"],
            "quantized_kv_start": settings["quantized_kv_start"],
        }
    if settings["max_kv_size"] is None:
        return [KVCache(**quantization) for _ in range(num_layers)]
    return [RotatingKVCache(settings["max_kv_size"], settings["keep"], **quantization) for _ in range(num_layers)]


class _Cache:
    """What both slot policies share: the stored form (plain or quantized), state, size, settings."""

    def __init__(self, bits: int | None, group_size: int, quantized_kv_start: int):
        self.keys: mx.array | QuantizedKV | None = None
        self.values: mx.array | QuantizedKV | None = None
        self.offset = 0
        self.family_state: dict = {}  # what a family remembers per sequence (JSON values), saved with the cache
        self.bits, self.group_size, self.quantized_kv_start = bits, group_size, quantized_kv_start

    @property
    def quantized(self) -> bool:
        return isinstance(self.keys, QuantizedKV)

    def _quantize(self, x: mx.array) -> QuantizedKV:
        return QuantizedKV(*mx.quantize(x, group_size=self.group_size, bits=self.bits), self.group_size, self.bits)

    def _stored_form(self, keys: mx.array, values: mx.array):
        """New keys/values as this cache stores them; converts what it holds once quantizing is due."""
        if self.bits is None or self.offset < self.quantized_kv_start:
            return keys, values
        if self.keys is not None and not self.quantized:
            self.keys, self.values = self._quantize(self.keys), self._quantize(self.values)
        return self._quantize(keys), self._quantize(values)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (allocated slots, not only the filled ones)."""
        return sum(a.nbytes for a in _arrays(self.keys) + _arrays(self.values))

    @property
    def settings(self) -> dict:
        return cache_settings(
            kv_bits=self.bits,
            kv_group_size=self.group_size,
            quantized_kv_start=self.quantized_kv_start,
            **self._slot_settings(),
        )

    def _slot_settings(self) -> dict:
        return {}

    def export(self) -> tuple[dict[str, mx.array], dict]:
        """What a prompt cache file keeps of this layer: arrays ("keys", or "keys.data",
        "keys.scales", "keys.biases" when quantized; the same for values) and JSON values."""
        arrays = {}
        for name, x in (("keys", self._saved(self.keys)), ("values", self._saved(self.values))):
            if isinstance(x, QuantizedKV):
                arrays.update({f"{name}.{part}": a for part, a in zip(PACKED_PARTS, x.arrays)})
            elif x is not None:
                arrays[name] = x
        return arrays, {"offset": self.offset, "family_state": self.family_state}

    def restore(self, arrays: dict[str, mx.array], info: dict, source: str) -> None:
        """The inverse of `export` on a fresh cache with the same settings (`source` names the file)."""

        def stored(name: str):
            if name in arrays:
                return arrays[name]
            parts = [f"{name}.{part}" for part in PACKED_PARTS]
            if all(part in arrays for part in parts):
                return QuantizedKV(*(arrays[part] for part in parts), self.group_size, self.bits)
            if info["offset"] == 0:
                return None
            raise MlxfamError(f"{source}: tensor {name!r} (or {', '.join(parts)}) is missing")

        self.keys, self.values = stored("keys"), stored("values")
        self.offset, self.family_state = info["offset"], info["family_state"]

    def _saved(self, x):
        return x


class KVCache(_Cache):
    step = 256

    def __init__(self, bits: int | None = None, group_size: int = 64, quantized_kv_start: int = 0):
        super().__init__(bits, group_size, quantized_kv_start)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Appends `(B, kv_heads, L, head_dim)` keys/values; returns everything stored so far
        (arrays, or QuantizedKV once the cache quantizes)."""
        keys, values = self._stored_form(keys, values)
        start, length = self.offset, slot_count(keys)
        if self.keys is None or start + length > slot_count(self.keys):
            self._grow(keys, values, start + length)
        self.offset = start + length
        self.keys = _each_part(lambda buffer, new: _write(buffer, start, new), self.keys, keys)
        self.values = _each_part(lambda buffer, new: _write(buffer, start, new), self.values, values)
        return self._filled(self.keys), self._filled(self.values)

    def _filled(self, x):
        return _each_part(lambda a: a[..., : self.offset, :], x)

    def _grow(self, keys, values, needed: int):
        capacity = (needed + self.step - 1) // self.step * self.step
        extra = capacity - self.offset
        if self.keys is None:
            self.keys, self.values = (_each_part(lambda new: _zeros_like_slots(new, extra), x) for x in (keys, values))
            return

        def extend(buffer, new):
            return mx.concatenate([buffer[..., : self.offset, :], _zeros_like_slots(new, extra)], axis=2)

        self.keys, self.values = _each_part(extend, self.keys, keys), _each_part(extend, self.values, values)

    def make_mask(self, query_len: int, window: int | None) -> mx.array | str | None:
        return attention_mask(query_len, self.offset, window)

    def key_positions(self, query_len: int) -> np.ndarray:
        """Absolute position of each key the next `update_and_fetch` of `query_len` tokens returns."""
        return np.arange(self.offset + query_len)

    @property
    def state(self) -> list[mx.array]:
        """The filled buffers: what `mx.eval` needs to materialise the cache."""
        if self.keys is None:
            return []
        return _arrays(self._filled(self.keys)) + _arrays(self._filled(self.values))

    def _saved(self, x):
        return None if x is None else self._filled(x)


class RotatingKVCache(_Cache):
    """A bounded cache of `max_size` slots: the first `keep` tokens stay, the rest is a window.

    Query at position q sees keys at p <= q with p < keep or p > q - (max_size - keep); with
    keep = 0 and max_size = W that is exactly a sliding window of W. Each slot's absolute
    position is tracked on the host (`slot_positions`), so masks follow the slots whatever order
    they are in: decoding overwrites the oldest windowed slot in place (no copy per token); a
    multi-token step attends over the old slots plus the new ones, then keeps only what later
    queries see.
    """

    def __init__(
        self,
        max_size: int,
        keep: int = 0,
        bits: int | None = None,
        group_size: int = 64,
        quantized_kv_start: int = 0,
    ):
        if max_size <= keep:
            raise MlxfamError(f"max_kv_size ({max_size}) must be larger than keep ({keep})")
        super().__init__(bits, group_size, quantized_kv_start)
        self.max_size, self.keep = max_size, keep
        self.slot_positions = np.zeros(0, dtype=np.int64)  # absolute position held by each filled slot

    def _slot_settings(self) -> dict:
        return {"max_kv_size": self.max_size, "keep": self.keep}

    def _overwrite_slot(self) -> int | None:
        """The slot a single new token goes to: the next free one, else the oldest windowed one."""
        if self.keys is None:
            return None
        if len(self.slot_positions) < slot_count(self.keys):
            return len(self.slot_positions)
        windowed = np.flatnonzero(self.slot_positions >= self.keep)
        return int(windowed[np.argmin(self.slot_positions[windowed])])

    def key_positions(self, length: int) -> np.ndarray:
        """Slot positions of the keys the next `update_and_fetch` of `length` tokens returns."""
        slot = self._overwrite_slot() if length == 1 else None
        if slot is None:
            return np.concatenate([self.slot_positions, np.arange(self.offset, self.offset + length)])
        positions = self.slot_positions.copy()
        if slot == len(positions):
            positions = np.append(positions, self.offset)
        positions[slot] = self.offset
        return positions[: slot_count(self.keys)]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        keys, values = self._stored_form(keys, values)
        length = slot_count(keys)
        slot = self._overwrite_slot() if length == 1 else None
        positions = self.key_positions(length)
        self.offset += length
        if slot is not None:
            self.keys = _each_part(lambda buffer, new: _write(buffer, slot, new), self.keys, keys)
            self.values = _each_part(lambda buffer, new: _write(buffer, slot, new), self.values, values)
            self.slot_positions = positions
            filled = len(positions)
            return tuple(_each_part(lambda a: a[..., :filled, :], x) for x in (self.keys, self.values))
        if self.keys is not None:
            stored = len(self.slot_positions)

            def join(old, new):
                return mx.concatenate([old[..., :stored, :], new], axis=2)

            keys, values = _each_part(join, self.keys, keys), _each_part(join, self.values, values)
        newest = self.offset - 1
        kept = np.flatnonzero((positions < self.keep) | (positions > newest - (self.max_size - self.keep)))
        self.slot_positions = positions[kept]
        self.keys, self.values = self._into_buffer(keys, kept), self._into_buffer(values, kept)
        return keys, values

    def _into_buffer(self, x, kept: np.ndarray):
        """The kept slots, in a buffer of `max_size` slots so decoding can write in place."""
        index = None if len(kept) == slot_count(x) else mx.array(kept)

        def fit(a):
            kept_a = a if index is None else mx.take(a, index, axis=2)
            spare = self.max_size - kept_a.shape[2]
            return kept_a if spare == 0 else mx.concatenate([kept_a, _zeros_like_slots(a, spare)], axis=2)

        return _each_part(fit, x)

    def make_mask(self, query_len: int, window: int | None) -> mx.array | None:
        positions = self.key_positions(query_len)
        query_pos = np.arange(self.offset, self.offset + query_len)[:, None]
        visible = (positions <= query_pos) & (
            (positions < self.keep) | (positions > query_pos - (self.max_size - self.keep))
        )
        if window is not None:
            visible &= positions > query_pos - window
        return None if visible.all() else mx.array(visible)

    @property
    def state(self) -> list[mx.array]:
        return _arrays(self.keys) + _arrays(self.values)

    def export(self) -> tuple[dict[str, mx.array], dict]:
        arrays, info = super().export()
        arrays["slot_positions"] = mx.array(self.slot_positions)
        return arrays, info

    def restore(self, arrays: dict[str, mx.array], info: dict, source: str) -> None:
        super().restore(arrays, info, source)
        if "slot_positions" not in arrays:
            raise MlxfamError(f"{source}: tensor 'slot_positions' of a rotating cache is missing")
        self.slot_positions = np.array(arrays["slot_positions"]).astype(np.int64)
