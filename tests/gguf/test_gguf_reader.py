"""mlxfam's GGUF reader against llama.cpp's gguf-py (files it writes, what its reader sees), llama.cpp's
own malformed-file cases (tests/test-gguf.cpp: bad magic, versions, n_kv, n_tensors, key size, empty and
duplicate keys, value types, alignment, names, n_dims, shapes, types, offsets, duplicate names, data size,
mem-size overflow) plus the tensor count one short, every truncation, and a bounded byte-mutation fuzz run."""

import struct

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxfam.errors import MlxfamError
from mlxfam.gguf_quants import tensor_to_mlx
from mlxfam.gguf_reader import GGML_TYPES, read_gguf

F32, Q8_0, Q4_K, I8, I64 = 0, 8, 12, 24, 27
UINT32, INT32, STRING, ARRAY = 4, 5, 8, 9
U64_MAX = 2**64 - 1


# --- a byte-level GGUF builder whose every field a test can break -------------------------------------


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str, type_id: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", type_id) + payload


def tensor_info(name: str, ne: tuple[int, ...], type_id: int, offset: int, n_dims: int | None = None) -> bytes:
    dims = len(ne) if n_dims is None else n_dims
    return gguf_string(name) + struct.pack(f"<I{len(ne)}QIQ", dims, *ne, type_id, offset)


BASE_KVS = [
    kv("general.architecture", STRING, gguf_string("llama")),
    kv("llama.block_count", UINT32, struct.pack("<I", 2)),
    kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2) + gguf_string("a") + gguf_string("bc")),
    kv("nested", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", INT32, 2) + struct.pack("<2i", -1, 7)),
]
# (name, ne, type, nbytes): an F32 matrix, a Q8_0 matrix and a Q4_K row.
BASE_TENSORS = [("a", (8, 4), F32, 128), ("b", (32, 2), Q8_0, 68), ("c", (256,), Q4_K, 144)]


def craft(
    kvs=None,
    tensors=None,
    infos=None,
    magic=b"GGUF",
    version=3,
    n_tensors=None,
    n_kv=None,
    alignment=32,
    data_trim=0,
) -> bytes:
    """A GGUF image: header, `kvs` (raw entries), tensor infos (from `tensors` laid out at `alignment`,
    or raw `infos`), padding and data (bytes i % 256, less `data_trim` bytes)."""
    kvs = BASE_KVS if kvs is None else kvs
    tensors = BASE_TENSORS if tensors is None else tensors
    offset, info_bytes = 0, []
    for name, ne, type_id, nbytes in tensors:
        info_bytes.append(tensor_info(name, ne, type_id, offset))
        offset += nbytes + (-nbytes % alignment)
    infos = info_bytes if infos is None else infos
    header = magic + struct.pack(
        "<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = header + b"".join(kvs) + b"".join(infos)
    body += b"\0" * (-len(body) % alignment)
    data = bytes(i % 256 for i in range(offset))
    return body + data[: len(data) - data_trim]


def write(tmp_path, image: bytes, name="crafted.gguf"):
    path = tmp_path / name
    path.write_bytes(image)
    return path


def rejects(tmp_path, image: bytes, *fragments: str) -> str:
    path = write(tmp_path, image)
    with pytest.raises(MlxfamError) as caught:
        read_gguf(path)
    message = str(caught.value)
    assert str(path) in message and "at byte" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- valid files --------------------------------------------------------------------------------------


def test_crafted_file_reads(tmp_path):
    g = read_gguf(write(tmp_path, craft()))
    assert g.version == 3 and g.alignment == 32
    assert g.metadata["general.architecture"] == "llama" and g.metadata["llama.block_count"] == 2
    assert g.metadata["tokenizer.ggml.tokens"] == ["a", "bc"]
    assert [list(a) for a in g.metadata["nested"]] == [[-1, 7]]
    shapes = [(t.name, t.shape, t.nbytes) for t in g.tensors.values()]
    assert shapes == [("a", (4, 8), 128), ("b", (2, 32), 68), ("c", (256,), 144)]
    assert g.data("a").shape == (4, 8) and g.data("b").shape == (2, 34) and g.data("c").shape == (144,)


def test_header_only_file_reads(tmp_path):  # llama.cpp HEADER_EMPTY
    g = read_gguf(write(tmp_path, craft(kvs=[], tensors=[])))
    assert g.metadata == {} and g.tensors == {}


def test_zero_sized_dimension_reads(tmp_path):  # llama.cpp TENSORS_ZERO_DIM loads
    g = read_gguf(write(tmp_path, craft(tensors=[("z", (32, 0), F32, 0), *BASE_TENSORS])))
    assert g.tensors["z"].shape == (0, 32) and g.tensors["z"].nbytes == 0


def test_custom_alignment_reads(tmp_path):  # llama.cpp TENSORS_CUSTOM_ALIGN / DATA_CUSTOM_ALIGN
    alignment = kv("general.alignment", UINT32, struct.pack("<I", 64))
    g = read_gguf(write(tmp_path, craft(kvs=[*BASE_KVS, alignment], alignment=64)))
    assert g.alignment == 64 and all(t.offset % 64 == 0 for t in g.tensors.values())


def write_with_gguf_py(path):
    """A file written by llama.cpp's gguf-py with every value type, arrays, and tensors of several types."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint8("v.u8", 200)
    writer.add_int8("v.i8", -5)
    writer.add_uint16("v.u16", 60000)
    writer.add_int16("v.i16", -30000)
    writer.add_uint32("v.u32", 4_000_000_000)
    writer.add_int32("v.i32", -2_000_000_000)
    writer.add_float32("v.f32", 0.1)
    writer.add_uint64("v.u64", 2**63 + 5)
    writer.add_int64("v.i64", -(2**62))
    writer.add_float64("v.f64", 0.1)
    writer.add_bool("v.bool", True)
    writer.add_string("v.str", "héllo ✓")
    writer.add_array("v.ints", [1, -2, 3])
    writer.add_array("v.floats", [0.5, 1.5])
    writer.add_array("v.strs", ["x", "", "yz"])
    writer.add_array("v.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((7,)).astype(np.float16))
    writer.add_tensor("exps", rng.standard_normal((2, 3, 4)).astype(np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_matches_gguf_py_reader(tmp_path):
    path = tmp_path / "written.gguf"
    write_with_gguf_py(path)
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    assert list(ours.metadata) == [f.name for f in theirs.fields.values() if not f.name.startswith("GGUF.")]
    for field in theirs.fields.values():
        if field.name.startswith("GGUF."):
            continue
        value = ours.metadata[field.name]
        expected = field.contents()
        if field.name == "v.nested":  # gguf-py's contents() flattens nested arrays
            assert [v.tolist() for v in value] == [[1, 2], [3]] and sum(([*v] for v in value), []) == expected
        elif isinstance(value, np.ndarray):
            assert value.tolist() == expected
        elif isinstance(expected, float):
            assert value == pytest.approx(expected, rel=1e-7) and type(value) is float
        else:
            assert value == expected, field.name
    assert ours.metadata["v.f32"] == float(np.float32(0.1)) and ours.metadata["v.f64"] == 0.1
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.shape == tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(ours.data(t.name), t.data)
    assert np.array_equal(np.array(tensor_to_mlx(ours.tensors["f32"], ours.data("f32"))), theirs.tensors[0].data)


def test_type_table_matches_gguf_py():
    for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
        assert (GGML_TYPES[qtype.value].name, GGML_TYPES[qtype.value].block_size) == (qtype.name, block)
        assert GGML_TYPES[qtype.value].type_size == size
    assert len(GGML_TYPES) == len(gguf.GGML_QUANT_SIZES)


# --- llama.cpp's malformed files (tests/test-gguf.cpp), each named by the field it breaks --------------


def test_bad_magic(tmp_path):  # HEADER_BAD_MAGIC
    rejects(tmp_path, craft(magic=b"FUGG"), "magic")


@pytest.mark.parametrize(
    "version, fragment",
    [(0, "version 0"), (1, "version 1 (32-bit counts"), (4, "version 4"), (0x03000000, "big-endian")],
)
def test_bad_version(tmp_path, version, fragment):  # HEADER_BAD_VERSION_0 / _1 / _FUTURE
    rejects(tmp_path, craft(version=version), fragment, "supported: 2, 3")


def test_version_2_reads(tmp_path):
    assert read_gguf(write(tmp_path, craft(version=2))).version == 2


def test_bad_n_kv(tmp_path):  # HEADER_BAD_N_KV
    rejects(tmp_path, craft(n_kv=U64_MAX), "n_kv", "at byte 16")


def test_bad_n_tensors(tmp_path):  # HEADER_BAD_N_TENSORS
    rejects(tmp_path, craft(n_tensors=U64_MAX), "n_tensors", "at byte 8")


def test_bad_key_size(tmp_path):  # KV_BAD_KEY_SIZE
    bad = struct.pack("<Q", U64_MAX) + b"key" + struct.pack("<I", UINT32) + struct.pack("<I", 1)
    rejects(tmp_path, craft(kvs=[bad, *BASE_KVS]), "metadata key 0", "truncated", "at byte 24")


def test_empty_key(tmp_path):  # KV_EMPTY_KEY
    rejects(tmp_path, craft(kvs=[kv("", UINT32, struct.pack("<I", 1))]), "metadata key 0 is empty")


def test_bad_value_type(tmp_path):  # KV_BAD_TYPE
    rejects(tmp_path, craft(kvs=[kv("k", 13, b"\0")]), "'k'", "unknown value type 13")


def test_bad_array_element_type(tmp_path):
    rejects(tmp_path, craft(kvs=[kv("k", ARRAY, struct.pack("<IQ", 13, 1) + b"\0")]), "'k'", "unknown value type 13")


def test_duplicate_key(tmp_path):  # KV_DUPLICATE_KEY
    rejects(tmp_path, craft(kvs=[*BASE_KVS, BASE_KVS[1]]), "duplicate metadata key 'llama.block_count'")


@pytest.mark.parametrize("value", [13, 0])
def test_bad_alignment(tmp_path, value):  # KV_BAD_ALIGN / TENSORS_BAD_ALIGN / DATA_BAD_ALIGN
    alignment = kv("general.alignment", UINT32, struct.pack("<I", value))
    rejects(tmp_path, craft(kvs=[*BASE_KVS, alignment]), "'general.alignment'", f"is {value}, not a power of two")


def test_alignment_of_wrong_type(tmp_path):  # KV_WRONG_TYPE_ALIGN
    alignment = kv("general.alignment", INT32, struct.pack("<i", 32))
    rejects(tmp_path, craft(kvs=[*BASE_KVS, alignment]), "'general.alignment' must be UINT32, not INT32")


def test_array_size_beyond_file(tmp_path):  # the removed KV_BAD_VALUE_SIZE, without allocating it
    huge = kv("k", ARRAY, struct.pack("<IQ", INT32, 2**61))
    rejects(tmp_path, craft(kvs=[huge]), f"{2**61} elements of metadata 'k'", "truncated")
    strings = kv("k", ARRAY, struct.pack("<IQ", STRING, 2**61))
    rejects(tmp_path, craft(kvs=[strings]), "elements of metadata 'k'")


def test_string_length_beyond_file(tmp_path):
    rejects(tmp_path, craft(kvs=[kv("k", STRING, struct.pack("<Q", 2**40))]), "metadata 'k' needs", "truncated")


def test_arrays_nested_too_deep(tmp_path):
    payload = struct.pack("<IQ", INT32, 0)
    for _ in range(10):
        payload = struct.pack("<IQ", ARRAY, 1) + payload
    rejects(tmp_path, craft(kvs=[kv("deep", ARRAY, payload)]), "'deep'", "nests arrays deeper")


def test_key_not_utf8(tmp_path):
    rejects(tmp_path, craft(kvs=[gguf_string(b"\xff\xfe") + struct.pack("<II", UINT32, 1)]), "not valid UTF-8")


def test_name_too_long(tmp_path):  # TENSORS_BAD_NAME_SIZE
    long_name = "my_tensor_with_a_very_long_name_which_is_longer_than_what_is_allowed_for_ggml_tensors"
    rejects(tmp_path, craft(tensors=[(long_name, (8, 4), F32, 128)]), "tensor 0 name", "1 to 63 bytes")


@pytest.mark.parametrize("n_dims", [5, 0])
def test_bad_n_dims(tmp_path, n_dims):  # TENSORS_BAD_N_DIMS
    infos = [tensor_info("a", (8, 4), F32, 0, n_dims=n_dims)]
    rejects(tmp_path, craft(tensors=[], infos=infos), "tensor 'a'", f"n_dims {n_dims} is not 1 to 4")


def test_negative_dimension(tmp_path):  # TENSORS_BAD_SHAPE
    infos = [tensor_info("a", (U64_MAX, U64_MAX), F32, 0)]
    rejects(tmp_path, craft(tensors=[], infos=infos), "tensor 'a'", "negative or too large")


def test_ne_too_big(tmp_path):  # TENSORS_NE_TOO_BIG: the element count overflows int64
    big = 4 * (2**31 - 1)
    infos = [tensor_info("a", (big, big), F32, 0)]
    rejects(tmp_path, craft(tensors=[], infos=infos), "tensor 'a'", "overflow int64")


def test_nbytes_too_big(tmp_path):  # TENSORS_NBYTES_TOO_BIG: fits int64 elements, not the file
    dim = int(1.01 * (2**64 // 8) ** 0.5) + 1
    infos = [tensor_info("a", (dim, dim), I64, 0)]
    rejects(tmp_path, craft(tensors=[], infos=infos), "tensor 'a'", "outside the")


@pytest.mark.parametrize("type_id, fragment", [(42, "unknown ggml type id 42"), (4, "unknown ggml type id 4")])
def test_bad_tensor_type(tmp_path, type_id, fragment):  # TENSORS_BAD_TYPE (GGML_TYPE_COUNT; a removed id)
    rejects(tmp_path, craft(tensors=[("a", (8, 4), type_id, 128)]), "tensor 'a'", fragment)


def test_ne0_not_a_block_multiple(tmp_path):
    rejects(tmp_path, craft(tensors=[("b", (16, 2), Q8_0, 34)]), "tensor 'b'", "not a multiple of Q8_0's block size 32")


@pytest.mark.parametrize("offset, fragment", [(U64_MAX, "not a multiple of the alignment"), (2**63, "outside the")])
def test_bad_offset(tmp_path, offset, fragment):  # TENSORS_BAD_OFFSET
    infos = [tensor_info("a", (8, 4), F32, offset)]
    rejects(tmp_path, craft(tensors=[], infos=infos), "tensor 'a'", fragment)


def test_duplicate_tensor_name(tmp_path):  # TENSORS_DUPLICATE_NAME
    rejects(tmp_path, craft(tensors=[*BASE_TENSORS, ("a", (8, 4), F32, 128)]), "duplicate tensor name 'a'")


def test_inconsistent_alignment(tmp_path):  # TENSORS_INCONSISTENT_ALIGN: offsets laid out at alignment 1
    offset, infos = 0, []
    for name, ne, type_id, nbytes in BASE_TENSORS:
        infos.append(tensor_info(name, ne, type_id, offset))
        offset += nbytes
    rejects(tmp_path, craft(infos=infos), "tensor 'c'", "data offset 196", "not a multiple of the alignment 32")


def test_not_enough_data(tmp_path):  # DATA_NOT_ENOUGH_DATA
    image = craft(tensors=[("a", (8, 4), F32, 128)], data_trim=1)
    rejects(tmp_path, image, "tensor 'a'", "outside the")


def test_mem_size_overflow(tmp_path):  # DATA_MEM_SIZE_OVERFLOW: two tensors whose sizes sum past 2^64
    ne = 0x7FFFFFFFFFFFFFC0
    infos = [tensor_info("a", (ne,), I8, 0), tensor_info("b", (ne,), I8, ne)]
    rejects(tmp_path, craft(tensors=[], infos=infos) + bytes(32), "tensor 'a'", "outside the")


def test_overlapping_tensors(tmp_path):
    infos = [tensor_info("a", (8, 4), F32, 0), tensor_info("b", (8, 4), F32, 96)]
    image = craft(tensors=[], infos=infos) + bytes(224)
    rejects(tmp_path, image, "tensor 'b' data overlaps tensor 'a'")


def test_tensor_count_one_short(tmp_path):
    # The last tensor's info becomes "padding" and its data trails the counted tensors'.
    rejects(tmp_path, craft(n_tensors=len(BASE_TENSORS) - 1), "tensor count (2) does not cover the file")


def test_every_truncation(tmp_path):
    image = craft()
    last_padding = -BASE_TENSORS[-1][3] % 32  # a file may end without its last tensor's padding
    for size in range(len(image) - last_padding):
        with pytest.raises(MlxfamError):
            read_gguf(write(tmp_path, image[:size]))
    assert read_gguf(write(tmp_path, image[: len(image) - last_padding])).tensors.keys() == {"a", "b", "c"}


def test_missing_file(tmp_path):
    with pytest.raises(MlxfamError, match="cannot read GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


# --- fuzz: byte mutations of a valid file end in success or MlxfamError, never anything else ----------

_FUZZ_IMAGE = craft()


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    mutations=st.lists(st.tuples(st.integers(0, len(_FUZZ_IMAGE) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, len(_FUZZ_IMAGE))),
)
def test_fuzz_mutated_file(tmp_path_factory, mutations, cut):
    image = bytearray(_FUZZ_IMAGE)
    for position, value in mutations:
        image[position] = value
    path = tmp_path_factory.mktemp("fuzz") / "mutated.gguf"
    path.write_bytes(bytes(image[:cut]))
    try:
        g = read_gguf(path)
    except MlxfamError:
        return
    for info in g.tensors.values():
        try:
            tensor_to_mlx(info, g.data(info.name))
        except MlxfamError:
            pass
