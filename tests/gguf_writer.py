"""A small GGUF v3 writer and block codec for tests, written from the GGUF spec (ggml docs/gguf.md).

It is independent of mlxfam: tests quantize weights here, write llama.cpp-layout files (q/k rows
permuted as llama.cpp's converter does) and compare mlxfam's GGUF path against a model built from
the weights this module dequantizes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
_UINT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 6, 7, 8, 9
ALIGNMENT = 32


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `permute`: HF half-split rows -> interleaved rows per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize(w: np.ndarray, kind: int) -> bytes:
    """Rows of `w` in blocks of 32 along the last axis, in ggml's block layout."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    out = bytearray()
    for b in blocks:
        if kind == Q8_0:
            d = np.abs(b).max() / 127
            q = np.round(b / d).astype(np.int8) if d else np.zeros(32, np.int8)
            out += np.float16(d).tobytes() + q.tobytes()
        elif kind == Q4_0:
            m = b[np.argmax(np.abs(b))]
            d = m / -8
            q = np.clip(np.floor(b / d + 8.5), 0, 15).astype(np.uint8) if d else np.full(32, 8, np.uint8)
            out += np.float16(d).tobytes() + (q[:16] | (q[16:] << 4)).tobytes()
        elif kind == Q4_1:
            lo, hi = b.min(), b.max()
            d = (hi - lo) / 15
            q = np.clip(np.round((b - lo) / d), 0, 15).astype(np.uint8) if d else np.zeros(32, np.uint8)
            out += np.float16(d).tobytes() + np.float16(lo).tobytes() + (q[:16] | (q[16:] << 4)).tobytes()
        else:
            raise ValueError(kind)
    return bytes(out)


def dequantize(data: bytes, kind: int, shape: tuple[int, ...]) -> np.ndarray:
    """The reference decoder: what each block format means, element by element."""
    size = {Q8_0: 34, Q4_0: 18, Q4_1: 20}[kind]
    values = []
    for i in range(0, len(data), size):
        blk = data[i : i + size]
        d = np.frombuffer(blk[:2], np.float16).astype(np.float32)[0]
        if kind == Q8_0:
            values.append(np.frombuffer(blk[2:], np.int8).astype(np.float32) * d)
            continue
        qs = np.frombuffer(blk[-16:], np.uint8)
        q = np.concatenate([qs & 0xF, qs >> 4]).astype(np.float32)
        if kind == Q4_0:
            values.append((q - 8) * d)
        else:
            m = np.frombuffer(blk[2:4], np.float16).astype(np.float32)[0]
            values.append(q * d + m)
    return np.concatenate(values).reshape(shape)


def encode_tensor(w: np.ndarray, kind: int) -> bytes:
    if kind == F32:
        return w.astype(np.float32).tobytes()
    if kind == F16:
        return w.astype(np.float16).tobytes()
    return quantize(w, kind)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", _BOOL, v)
    if isinstance(v, int):
        return struct.pack("<II", _UINT32, v)
    if isinstance(v, float):
        return struct.pack("<If", _FLOAT32, v)
    if isinstance(v, str):
        return struct.pack("<I", _STRING) + _string(v)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", _ARRAY, _STRING, len(v)) + b"".join(_string(x) for x in v)
    raise TypeError(v)


def write(path, metadata: dict, tensors: dict[str, tuple[bytes, tuple[int, ...], int]]):
    """tensors: name -> (encoded data, numpy shape (rows, cols), ggml type)."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_string(k) + _value(v) for k, v in metadata.items())
    offset, infos, blobs = 0, b"", []
    for name, (data, shape, kind) in tensors.items():
        dims = tuple(reversed(shape))  # ggml ne[0] is the fastest-varying axis
        infos += _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, kind, offset)
        padded = data + b"\0" * (-len(data) % ALIGNMENT)
        blobs.append(padded)
        offset += len(padded)
    body = header + infos
    body += b"\0" * (-len(body) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(body + b"".join(blobs))


# --- the yi golden fixture as a llama.cpp GGUF -------------------------------------------------------

YI = Path(__file__).parent / "data" / "golden" / "yi"

_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem = hf_name.removesuffix(".weight")
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        return f"blk.{layer}.{_GGUF_NAMES[part]}.weight"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[stem] + ".weight"


def write_yi_gguf(path: Path, kind: int) -> dict[str, np.ndarray]:
    """Writes the yi golden as a llama.cpp GGUF with matrices in `kind`; returns the HF-named
    weights the file encodes (dequantized by the reference decoder)."""
    config = json.loads((YI / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(YI / "model.safetensors")).items()}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors, decoded = {}, {}
    for name, w in weights.items():
        target = F32 if w.ndim == 1 else kind
        stored = w
        part = gguf_name(name).split(".")[2] if name.startswith("model.layers.") else None
        if part in heads:
            stored = llama_cpp_permute(w, heads[part])
        data = encode_tensor(stored, target)
        tensors[gguf_name(name)] = (data, w.shape, target)
        if target in (Q4_0, Q4_1, Q8_0):
            # Rows move whole under the permutation, so decoding the unpermuted rows is the same.
            decoded[name] = dequantize(encode_tensor(w, target), target, w.shape)
        else:
            decoded[name] = w.astype(np.float16).astype(np.float32) if target == F16 else w
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": config["num_hidden_layers"],
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "llama.rope.freq_base": config["rope_theta"],
    }
    write(path, metadata, tensors)
    return decoded
