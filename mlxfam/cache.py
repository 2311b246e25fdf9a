"""KV caches. A model makes one per layer with `model.make_cache(options)` (see `CacheOptions`).

Two slot policies:

- `KVCache` (standard) holds every token in order. Its buffers grow in steps of `step` slots
  and new keys/values are written in place, so decoding does not copy the whole cache each token.
- `RotatingKVCache` holds at most `max_size` slots: the first `keep` tokens stay and the rest is
  a window of the latest tokens (see the class).

Either stores keys and values as plain `(B, kv_heads, slots, head_dim)` arrays in the model's
dtype, or, with `bits` set, quantized (`QuantizedKV`). With `quantized_kv_start` N > 0 a
quantizing cache stores plain arrays until it holds N tokens; its next update then quantizes what
it holds and everything after is stored quantized.

The packed form is `mlxfam.kv_layout`'s: tokens are quantized a block of `group_size` at a time
(keys per channel, values per token), by `mlxfam.kernels.kv_write.quantize_kv_blocks` (keys and values
of whole blocks in one launch of the Metal/CUDA cache write on a GPU, `mx.quantize` elsewhere), and
until a block is full its tokens wait in a float tail.

Slots: the S packed slots come first, then the T tail slots. A standard cache holds them in token
order. A rotating cache holds its packed blocks in no particular order (a block is the unit it keeps
or drops), `slot_positions[s]` being the absolute position held by slot s (packed, then tail).
The arrays handed to attention are views of preallocated buffers (sliced on the slot axis).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .errors import MlxfamError
from .kernels.kv_write import quantize_kv_blocks
from .kv_layout import KV_BITS, KV_GROUP_SIZES, QUANTIZED_ARRAYS, QuantizedKV


class Units(NamedTuple):
    """Stored keys or values as a run of units along each part's slot axis: plain `(B, kv_heads,
    slots, head_dim)` arrays (a unit is one slot), or packed blocks (a unit is `group_size` slots:
    `width` words or groups of each part). A cache keeps, grows and drops whole units."""

    parts: tuple[mx.array, ...]
    axes: tuple[int, ...]
    widths: tuple[int, ...]

    @property
    def count(self) -> int:
        return self.parts[0].shape[self.axes[0]] // self.widths[0]

    def _index(self, axis: int, index) -> tuple:
        return (slice(None),) * axis + (index,)

    def first(self, n: int) -> Units:
        return self._map(lambda a, axis, w: a[self._index(axis, slice(0, n * w))])

    def write(self, start: int, new: Units) -> Units:
        for a, b, axis, w in zip(self.parts, new.parts, self.axes, self.widths):
            a[self._index(axis, slice(start * w, (start + new.count) * w))] = b
        return self

    def then(self, new: Units) -> Units:
        return Units(
            tuple(mx.concatenate([a, b], axis) for a, b, axis in zip(self.parts, new.parts, self.axes)),
            self.axes,
            self.widths,
        )

    def take(self, units: np.ndarray) -> Units:
        def pick(a, axis, w):
            slots = (units[:, None] * w + np.arange(w)).reshape(-1)
            return mx.take(a, mx.array(slots), axis=axis)

        return self._map(pick)

    def zeros(self, n: int) -> Units:
        def empty(a, axis, w):
            shape = list(a.shape)
            shape[axis] = n * w
            return mx.zeros(shape, a.dtype)

        return self._map(empty)

    def _map(self, fn) -> Units:
        return Units(
            tuple(fn(a, axis, w) for a, axis, w in zip(self.parts, self.axes, self.widths)), self.axes, self.widths
        )


def plain_units(x: mx.array) -> Units:
    return Units((x,), (2,), (1,))


def packed_blocks(parts, group_size: int, bits: int, per_channel: bool) -> Units:
    """Packed (data, scales, biases) in `mlxfam.kv_layout`'s layout, as units of a block each."""
    if per_channel:
        return Units(tuple(parts), (3, 3, 3), (group_size * bits // 32, 1, 1))
    return Units(tuple(parts), (2, 2, 2), (group_size,) * 3)


def packed_kv_units(
    keys: mx.array, values: mx.array, group_size: int, bits: int, choice: str | None = None
) -> tuple[Units, Units]:
    """`(B, kv_heads, n * group_size, head_dim)` keys and values quantized into n blocks of
    `mlxfam.kv_layout`'s layout, in one launch of the kernels' cache write where a GPU kernel runs
    (`choice`: `mlxfam.kernels.backend`'s)."""
    key_parts, value_parts = quantize_kv_blocks(keys, values, bits=bits, group_size=group_size, choice=choice)
    return (
        packed_blocks(key_parts, group_size, bits, per_channel=True),
        packed_blocks(value_parts, group_size, bits, per_channel=False),
    )


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


@dataclass(frozen=True)
class CacheOptions:
    """How a model's KV cache stores keys and values, checked once here (`model.make_cache(options)`
    builds each layer's cache from them; `head_dim` is checked there).

    `kv_bits` (4 or 8) quantizes keys and values in groups of `kv_group_size` (32 or 64, dividing
    head_dim), from the moment the cache holds `quantized_kv_start` tokens; `max_kv_size` bounds the
    cache (a `RotatingKVCache`: the first `keep` tokens always stay)."""

    kv_bits: int | None = None
    kv_group_size: int = 64
    max_kv_size: int | None = None
    keep: int = 4
    quantized_kv_start: int = 0

    def __post_init__(self):
        if self.kv_bits is not None and (isinstance(self.kv_bits, bool) or self.kv_bits not in KV_BITS):
            raise MlxfamError(f"kv_bits must be 4 or 8 (or None for an unquantized cache), got {self.kv_bits!r}")
        if isinstance(self.kv_group_size, bool) or self.kv_group_size not in KV_GROUP_SIZES:
            raise MlxfamError(f"kv_group_size must be 32 or 64, got {self.kv_group_size!r}")
        check_integer("quantized_kv_start", self.quantized_kv_start, minimum=0)
        if self.max_kv_size is not None:
            check_integer("max_kv_size", self.max_kv_size, minimum=1)
            check_integer("keep", self.keep, minimum=0)
            if self.max_kv_size <= self.keep:
                raise MlxfamError(f"max_kv_size ({self.max_kv_size}) must be larger than keep ({self.keep})")

    @classmethod
    def given(cls, options: CacheOptions | None, keywords: dict) -> CacheOptions:
        """`options`, or the options `keywords` name (the keyword form of `make_cache`), not both."""
        if options is None:
            return cls(**keywords)
        if keywords:
            raise MlxfamError(f"cache options given twice: a CacheOptions and keywords {', '.join(sorted(keywords))}")
        if not isinstance(options, CacheOptions):
            raise MlxfamError(f"cache options must be a CacheOptions, got {options!r}")
        return options

    @property
    def keywords(self) -> dict:
        """The options that differ from the defaults, as `make_cache` keywords: the bare call
        `make_cache()` when none do, as a model following mlx-lm's protocol expects."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def check_head_dim(self, head_dim: int) -> None:
        if self.kv_bits is not None and head_dim % self.kv_group_size:
            raise MlxfamError(
                f"kv_group_size {self.kv_group_size} does not divide the model's head_dim {head_dim}, "
                "so its values cannot be quantized in groups of that size"
            )

    def layer_cache(self, window: int | None = None) -> KVCache | RotatingKVCache:
        """The cache of one layer. `window`: the layer attends only its last `window` keys and keeps
        only those, in a rotating cache of `window` slots (keep 0), where the `max_kv_size` bound
        does not cut tighter: then it sees exactly what it would see in the bounded cache."""
        quantization = {
            "bits": self.kv_bits,
            "group_size": self.kv_group_size,
            "quantized_kv_start": self.quantized_kv_start,
        }
        if window is not None and (self.max_kv_size is None or window <= self.max_kv_size - self.keep):
            return RotatingKVCache(window, 0, **quantization)
        if self.max_kv_size is None:
            return KVCache(**quantization)
        return RotatingKVCache(self.max_kv_size, self.keep, **quantization)


def layer_cache_from_settings(settings: dict, source: str) -> KVCache | RotatingKVCache:
    """The empty cache whose `settings` these are (as a prompt cache file records them): each kind
    is the uniform cache of the options it names."""
    options = {name: value for name, value in settings.items() if name != "kind"}
    try:
        cache = CacheOptions(**options).layer_cache()
    except TypeError:
        cache = None
    if cache is None or cache.settings != settings:
        raise MlxfamError(f"{source}: cache settings {settings} describe no cache mlxfam makes")
    return cache


class _Cache:
    """What both slot policies share: the stored form (plain or quantized), state, size, settings.

    A policy places whole units (`Units`): `self.keys` / `self.values` are its buffers, of which the
    first `self.units` are in use; a quantizing cache also holds the float tails of its next block."""

    def __init__(
        self,
        bits: int | None = None,
        group_size: int = CacheOptions.kv_group_size,
        quantized_kv_start: int = CacheOptions.quantized_kv_start,
    ):
        self.keys: Units | None = None
        self.values: Units | None = None
        self.units = 0
        self.key_tail: mx.array | None = None  # quantizing only: the newest (< group_size) tokens
        self.value_tail: mx.array | None = None
        self.offset = 0
        self.family_state: dict = {}  # what a family remembers per sequence (JSON values), saved with the cache
        self.bits, self.group_size, self.quantized_kv_start = bits, group_size, quantized_kv_start

    @property
    def quantized(self) -> bool:
        return self.key_tail is not None

    @property
    def unit_size(self) -> int:
        return self.group_size if self.quantized else 1

    @property
    def tail_len(self) -> int:
        return self.key_tail.shape[2] if self.quantized else 0

    def _new_units(self, keys: mx.array, values: mx.array):
        """This step's keys/values as whole units to store (None: no whole unit yet), and, for a
        quantizing cache, the float keys/values the step attends besides the units stored before it:
        its tail and the step's own tokens. A quantizing cache packs the full blocks among these (and,
        once quantizing is due, what it held in plain form)."""
        if self.bits is None or self.offset < self.quantized_kv_start:
            return plain_units(keys), plain_units(values), None
        if not self.quantized:
            self._start_quantizing(keys)
        keys = mx.concatenate([self.key_tail, keys], axis=2)
        values = mx.concatenate([self.value_tail, values], axis=2)
        whole = keys.shape[2] // self.group_size * self.group_size
        self.key_tail, self.value_tail = keys[:, :, whole:], values[:, :, whole:]
        if whole == 0:
            return None, None, (keys, values)
        return (*packed_kv_units(keys[:, :, :whole], values[:, :, :whole], self.group_size, self.bits), (keys, values))

    def _start_quantizing(self, like: mx.array) -> None:
        """Switches to the quantized form: the tokens held so far (in position order) become the tail
        that the caller's step then packs with its own."""
        held_k, held_v = self._held_in_order()
        if held_k is None:
            held_k = held_v = mx.zeros((*like.shape[:2], 0, like.shape[-1]), like.dtype)
        block = mx.zeros((*like.shape[:2], self.group_size, like.shape[-1]), like.dtype)
        # Empty units of the packed shapes (the quantization itself is never evaluated).
        empty = packed_kv_units(block, block, self.group_size, self.bits, choice="reference")
        self.keys, self.values = (x.zeros(0) for x in empty)
        self.units = 0
        self.key_tail, self.value_tail = held_k, held_v

    def fetched(self, keys: Units, values: Units, units: int, floats: tuple | None = None):
        """What attention reads: the first `units` units of `keys`/`values`, then (quantized) the float
        keys/values `floats`, by default the tails.

        A step attends the blocks stored before it packed and its own tokens in float, even those it
        packs for later steps (as a decoded token sees its own block's tokens in float): in decode
        the newest keys, which take most of the attention, keep full precision, and prefill
        attends as decode would."""
        k, v = keys.first(units).parts, values.first(units).parts
        if not self.quantized:
            return k[0], v[0]
        tail_k, tail_v = floats or (self.key_tail, self.value_tail)
        return (
            QuantizedKV(*k, tail_k, self.group_size, self.bits, True),
            QuantizedKV(*v, tail_v, self.group_size, self.bits, False),
        )

    def _step_fetch(self, stored_before: int, floats) -> tuple:
        """What a step attends (see `fetched`): plain, every stored unit (its own tokens among them);
        quantized, the units stored before it, then `floats`."""
        return self.fetched(self.keys, self.values, self.units if floats is None else stored_before, floats)

    @property
    def held(self):
        """The keys and values the cache holds, as attention would read them (arrays or QuantizedKV)."""
        return self.fetched(self.keys, self.values, self.units)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (allocated units, not only the used ones)."""
        buffers = [] if self.keys is None else [*self.keys.parts, *self.values.parts]
        if self.quantized:
            buffers += [self.key_tail, self.value_tail]
        return sum(a.nbytes for a in buffers)

    @property
    def state(self) -> list[mx.array]:
        """The used buffers and tails: what `mx.eval` needs to materialise the cache."""
        if self.keys is None:
            return []
        return [a for x in self.held for a in _arrays(x)]

    @property
    def settings(self) -> dict:
        """This cache's kind and the options that shape it (CacheOptions' names; the group size and
        start only when it quantizes): what a prompt cache file records of each layer."""
        settings = {"kind": type(self).__name__, "kv_bits": self.bits}
        if self.bits is not None:
            settings.update(kv_group_size=self.group_size, quantized_kv_start=self.quantized_kv_start)
        return settings | self._slot_settings()

    def _slot_settings(self) -> dict:
        return {}

    def export(self) -> tuple[dict[str, mx.array], dict]:
        """What a prompt cache file keeps of this layer: arrays ("keys", or "keys.data",
        "keys.scales", "keys.biases", "keys.tail" when quantized; the same for values) and JSON values."""
        arrays = {}
        if self.keys is not None:
            for name, x in zip(("keys", "values"), self.held):
                if isinstance(x, QuantizedKV):
                    arrays.update({f"{name}.{part}": a for part, a in zip(QUANTIZED_ARRAYS, x.arrays)})
                else:
                    arrays[name] = x
        return arrays, {"offset": self.offset, "family_state": self.family_state}

    def restore(self, arrays: dict[str, mx.array], info: dict, source: str) -> None:
        """The inverse of `export` on a fresh cache with the same settings (`source` names the file)."""
        self.offset, self.family_state = info["offset"], info["family_state"]
        if "keys" in arrays and "values" in arrays:
            self.keys, self.values = plain_units(arrays["keys"]), plain_units(arrays["values"])
        elif all(f"{name}.{part}" in arrays for name in ("keys", "values") for part in QUANTIZED_ARRAYS):
            key_parts, value_parts = (
                [arrays[f"{name}.{part}"] for part in QUANTIZED_ARRAYS] for name in ("keys", "values")
            )
            self.key_tail, self.value_tail = key_parts.pop(), value_parts.pop()
            self.keys = packed_blocks(key_parts, self.group_size, self.bits, per_channel=True)
            self.values = packed_blocks(value_parts, self.group_size, self.bits, per_channel=False)
        elif self.offset == 0:
            return
        else:
            raise MlxfamError(f"{source}: tensors 'keys' and 'values' (or their packed parts) are missing")
        self.units = self.keys.count


def _arrays(x: mx.array | QuantizedKV) -> list[mx.array]:
    return list(x.arrays) if isinstance(x, QuantizedKV) else [x]


class KVCache(_Cache):
    """Every token, in order. Buffers grow in steps of `step` slots; each step writes in place."""

    step = 256

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Appends `(B, kv_heads, L, head_dim)` keys/values; returns the keys/values this step attends:
        every token so far (arrays, or QuantizedKV once the cache quantizes: see `fetched`)."""
        new_keys, new_values, floats = self._new_units(keys, values)
        self.offset += keys.shape[2]
        stored_before = self.units
        if new_keys is not None:
            needed = self.units + new_keys.count
            if self.keys is None or needed > self.keys.count:
                self._grow(new_keys, new_values, needed)
            self.keys.write(self.units, new_keys)
            self.values.write(self.units, new_values)
            self.units = needed
        return self._step_fetch(stored_before, floats)

    def _grow(self, keys: Units, values: Units, needed: int) -> None:
        step = max(1, self.step // self.unit_size)
        extra = (needed + step - 1) // step * step - self.units
        if self.keys is None:
            self.keys, self.values = keys.zeros(extra), values.zeros(extra)
        else:
            self.keys = self.keys.first(self.units).then(keys.zeros(extra))
            self.values = self.values.first(self.units).then(values.zeros(extra))

    def _held_in_order(self):
        if self.keys is None:
            return None, None
        return self.keys.first(self.units).parts[0], self.values.first(self.units).parts[0]

    def make_mask(self, query_len: int, window: int | None) -> mx.array | str | None:
        return attention_mask(query_len, self.offset, window)

    def key_positions(self, query_len: int) -> np.ndarray:
        """Absolute position of each key the next `update_and_fetch` of `query_len` tokens returns."""
        return np.arange(self.offset + query_len)


class RotatingKVCache(_Cache):
    """A bounded cache: the first `keep` tokens stay, the rest is a window of `max_size - keep`.

    Query at position q sees keys at p <= q with p < keep or p > q - (max_size - keep); with
    keep = 0 and max_size = W that is exactly a sliding window of W. Each stored unit's positions are
    tracked on the host (`unit_positions`), so masks follow the units whatever order they are in: a
    step that adds one unit (a decoded token; a quantizing cache's full block) overwrites a unit no
    later query sees, in place; a bigger step attends over the old units plus the new ones, then keeps
    only what later queries see. A quantizing cache keeps or drops whole blocks, so besides its tail
    it may hold a block more than `max_size` tokens need (the mask hides what the window excludes).
    """

    def __init__(self, max_size: int, keep: int = 0, **quantization):
        """`quantization`: bits, group_size, quantized_kv_start, as for a KVCache."""
        if max_size <= keep:
            raise MlxfamError(f"max_kv_size ({max_size}) must be larger than keep ({keep})")
        super().__init__(**quantization)
        self.max_size, self.keep = max_size, keep
        self.unit_positions = np.zeros((0, 1), dtype=np.int64)  # absolute positions held by each used unit
        self.tail_positions = np.zeros(0, dtype=np.int64)

    def _slot_settings(self) -> dict:
        return {"max_kv_size": self.max_size, "keep": self.keep}

    @property
    def slot_positions(self) -> np.ndarray:
        """The absolute position of each slot the cache holds: its units', then its tail's."""
        return np.concatenate([self.unit_positions.reshape(-1), self.tail_positions])

    def _needed(self, positions: np.ndarray, query: int) -> np.ndarray:
        """Which units (rows of `positions`) queries at position `query` and later may still see."""
        seen = (positions < self.keep) | (positions > query - (self.max_size - self.keep))
        return seen.any(axis=-1)

    def _capacity(self) -> int:
        """Units a buffer holds: every unit a query may see, so a new unit always finds a stale one to
        overwrite (window blocks need not start at a block boundary: one more block)."""
        u = self.unit_size
        return -(-self.keep // u) + -(-(self.max_size - self.keep) // u) + (u > 1)

    def _switches_now(self) -> bool:
        return self.bits is not None and not self.quantized and self.offset >= self.quantized_kv_start

    def _plan(self, length: int):
        """Where a step of `length` tokens goes: (positions of the units stored before it, of the new
        whole units, of the float tokens it attends (quantized; else None), of the tail after it, and
        the unit slot a single new unit overwrites in place, None when the step concatenates then trims)."""
        arriving = np.arange(self.offset, self.offset + length)
        held, size = self.unit_positions[: self.units], self.unit_size
        if self._switches_now():  # everything held goes back through the tail, in position order
            floats = np.concatenate([np.sort(held.reshape(-1)), arriving])
            held, size = np.zeros((0, self.group_size), dtype=np.int64), self.group_size
        elif self.quantized:
            floats = np.concatenate([self.tail_positions, arriving])
        else:
            floats = None
        pending = arriving if floats is None else floats
        whole = len(pending) // size * size
        new, tail = pending[:whole].reshape(-1, size), pending[whole:]
        slot = None
        if len(new) == 1 and len(held):
            if self.units < self.keys.count:
                slot = self.units
            else:
                stale = np.flatnonzero(~self._needed(held, self.offset))
                slot = int(stale[np.argmin(held[stale, 0])]) if stale.size else None
        return held, new, floats, tail, slot

    def key_positions(self, length: int) -> np.ndarray:
        """Slot positions of the keys the next `update_and_fetch` of `length` tokens returns."""
        held, new, floats, _, slot = self._plan(length)
        if floats is not None:  # the units stored before (an overwritten one is stale: masked), then floats
            return np.concatenate([held.reshape(-1), floats])
        if slot is None or slot == len(held):
            return np.concatenate([held, new]).reshape(-1)
        units = held.copy()
        units[slot] = new[0]
        return units.reshape(-1)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.unit_positions, new_positions, _, self.tail_positions, slot = self._plan(keys.shape[2])
        new_keys, new_values, floats = self._new_units(keys, values)
        self.offset += keys.shape[2]
        stored_before = self.units
        if new_keys is None:
            return self._step_fetch(stored_before, floats)
        if slot is not None:
            self.keys.write(slot, new_keys)
            self.values.write(slot, new_values)
            if slot == self.units:
                self.units += 1
                self.unit_positions = np.concatenate([self.unit_positions, new_positions])
            else:
                self.unit_positions[slot] = new_positions[0]
            return self._step_fetch(stored_before, floats)
        if self.keys is None:
            self.keys, self.values = new_keys.zeros(0), new_values.zeros(0)
        before_keys, before_values = self.keys.first(self.units), self.values.first(self.units)
        new_keys, new_values = before_keys.then(new_keys), before_values.then(new_values)
        if floats is None:  # plain: the step attends its own tokens as stored
            fetched = self.fetched(new_keys, new_values, new_keys.count)
        else:
            fetched = self.fetched(before_keys, before_values, stored_before, floats)
        new_positions = np.concatenate([self.unit_positions, new_positions])
        kept = np.flatnonzero(self._needed(new_positions, self.offset))
        self.unit_positions = new_positions[kept]
        self.keys, self.values = self._into_buffer(new_keys, kept), self._into_buffer(new_values, kept)
        self.units = len(kept)
        return fetched

    def _into_buffer(self, x: Units, kept: np.ndarray) -> Units:
        """The kept units, in a buffer of `_capacity()` units so later steps can write in place."""
        kept_units = x if len(kept) == x.count else x.take(kept)
        spare = self._capacity() - kept_units.count
        return kept_units if spare <= 0 else kept_units.then(kept_units.zeros(spare))

    def _held_in_order(self):
        if self.keys is None:
            return None, None
        order = np.argsort(self.unit_positions[: self.units, 0], kind="stable")
        return [x.first(self.units).take(order).parts[0] for x in (self.keys, self.values)]

    def make_mask(self, query_len: int, window: int | None) -> mx.array | None:
        positions = self.key_positions(query_len)
        query_pos = np.arange(self.offset, self.offset + query_len)[:, None]
        visible = (positions <= query_pos) & (
            (positions < self.keep) | (positions > query_pos - (self.max_size - self.keep))
        )
        if window is not None:
            visible &= positions > query_pos - window
        return None if visible.all() else mx.array(visible)

    def export(self) -> tuple[dict[str, mx.array], dict]:
        arrays, info = super().export()
        arrays["unit_positions"] = mx.array(self.unit_positions)
        arrays["tail_positions"] = mx.array(self.tail_positions)
        return arrays, info

    def restore(self, arrays: dict[str, mx.array], info: dict, source: str) -> None:
        super().restore(arrays, info, source)
        for name in ("unit_positions", "tail_positions"):
            if name not in arrays:
                raise MlxfamError(f"{source}: tensor {name!r} of a rotating cache is missing")
            setattr(self, name, np.array(arrays[name]).astype(np.int64))
        if self.keys is not None:
            self.keys, self.values = (self._into_buffer(x, np.arange(x.count)) for x in (self.keys, self.values))
