"""KV caches. A model makes one per layer with `model.make_cache()`.

The standard cache preallocates its buffers in steps of `step` tokens and writes new keys and
values in place, so decoding does not copy the whole cache every token. `state` is what
`mx.eval` needs to materialise it (mlx-lm's generate loop evaluates `c.state` too).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import MlxfamError


def attention_mask(query_len: int, offset: int, window: int | None) -> mx.array | str | None:
    """Mask for `query_len` queries at absolute positions offset.. over keys 0..offset+query_len-1."""
    key_len = offset + query_len
    if window is None or window >= key_len:
        return "causal" if query_len > 1 else None
    query_pos = mx.arange(offset, key_len)[:, None]
    key_pos = mx.arange(key_len)[None]
    return (key_pos <= query_pos) & (key_pos > query_pos - window)


class KVCache:
    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.family_state: dict = {}  # what a family remembers per sequence (JSON values), saved with the cache

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Appends `(B, kv_heads, L, head_dim)` keys/values; returns everything stored so far."""
        start, length = self.offset, keys.shape[2]
        if self.keys is None or start + length > self.keys.shape[2]:
            self._grow(keys, values, start + length)
        self.offset = start + length
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int):
        capacity = (needed + self.step - 1) // self.step * self.step
        batch, kv_heads, _, _ = keys.shape

        def extend(buffer, new):
            block = mx.zeros((batch, kv_heads, capacity - self.offset, new.shape[-1]), new.dtype)
            return block if buffer is None else mx.concatenate([buffer[..., : self.offset, :], block], axis=2)

        self.keys, self.values = extend(self.keys, keys), extend(self.values, values)

    def make_mask(self, query_len: int, window: int | None) -> mx.array | str | None:
        return attention_mask(query_len, self.offset, window)

    def key_positions(self, query_len: int) -> np.ndarray:
        """Absolute position of each key the next `update_and_fetch` of `query_len` tokens returns."""
        return np.arange(self.offset + query_len)

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (allocated capacity, not only the filled part)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache:
    """A bounded cache of `max_size` slots: the first `keep` tokens stay, the rest is a window.

    Query at position q sees keys at p <= q with p < keep or p > q - (max_size - keep); with
    keep = 0 and max_size = W that is exactly a sliding window of W. Each slot's absolute
    position is tracked on the host, so masks follow the slots whatever order they are in:
    decoding overwrites the oldest windowed slot in place (no copy per token); a multi-token
    step attends over the old slots plus the new ones, then keeps only what later queries see.
    """

    def __init__(self, max_size: int, keep: int = 0):
        if max_size <= keep:
            raise MlxfamError(f"max_kv_size ({max_size}) must be larger than keep ({keep})")
        self.max_size, self.keep = max_size, keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.family_state: dict = {}  # what a family remembers per sequence (JSON values), saved with the cache
        self._positions = np.zeros(0, dtype=np.int64)  # absolute position held by each slot

    def _overwrite_slot(self) -> int | None:
        """The slot a single new token goes to: the next free one, else the oldest windowed one."""
        if self.keys is None:
            return None
        if len(self._positions) < self.keys.shape[2]:
            return len(self._positions)
        windowed = np.flatnonzero(self._positions >= self.keep)
        return int(windowed[np.argmin(self._positions[windowed])])

    def key_positions(self, length: int) -> np.ndarray:
        """Slot positions of the keys the next `update_and_fetch` of `length` tokens returns."""
        slot = self._overwrite_slot() if length == 1 else None
        if slot is None:
            return np.concatenate([self._positions, np.arange(self.offset, self.offset + length)])
        positions = self._positions.copy()
        if slot == len(positions):
            positions = np.append(positions, self.offset)
        positions[slot] = self.offset
        return positions[: self.keys.shape[2]]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        slot = self._overwrite_slot() if length == 1 else None
        positions = self.key_positions(length)
        self.offset += length
        if slot is not None:
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self._positions = positions
            filled = len(positions)
            return self.keys[..., :filled, :], self.values[..., :filled, :]
        if self.keys is not None:
            stored = len(self._positions)
            keys = mx.concatenate([self.keys[..., :stored, :], keys], axis=2)
            values = mx.concatenate([self.values[..., :stored, :], values], axis=2)
        newest = self.offset - 1
        kept = np.flatnonzero((positions < self.keep) | (positions > newest - (self.max_size - self.keep)))
        self._positions = positions[kept]
        self.keys, self.values = self._into_buffer(keys, kept), self._into_buffer(values, kept)
        return keys, values

    def _into_buffer(self, x: mx.array, kept: np.ndarray) -> mx.array:
        """The kept slots, in a buffer of `max_size` slots so decoding can write in place."""
        kept_x = x if len(kept) == x.shape[2] else mx.take(x, mx.array(kept), axis=2)
        batch, heads, n, dim = kept_x.shape
        if n == self.max_size:
            return kept_x
        return mx.concatenate([kept_x, mx.zeros((batch, heads, self.max_size - n, dim), x.dtype)], axis=2)

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
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
