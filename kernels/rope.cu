// Rotary position embedding kernels for mx.fast.cuda_kernel (see rope.py for the launchers).
//
// Line-for-line twin of rope.metal: same sections, same indexing, same order of operations; only the
// thread indices (blockIdx/threadIdx), the warp shuffles (__shfl_xor_sync, __shfl_down_sync over the
// full warp), the math functions (min, max, fabsf, roundf) and `__device__` differ.
// Sections are split on the `//@ <name>` lines: `header` is passed as the kernel header,
// every other section is the body of the kernel of that name (MLX generates the signature).
//
// Template parameters: T (the tensors' dtype), INTERLEAVED (pairs (2i, 2i+1) instead of
// (i, i + R/2)).
// Runtime sizes come from the input shapes: the cos/sin tables are (streams, batch or 1, L, R/2)
// float32 and row-contiguous; the tensors are read through their strides (no copy of a view).

//@ header
// Where output dim `d` of a head takes its rotation from. A head is split into `streams` parts
// (2 for ChatGLM-6B's 2D rotary), part p turned by position stream p; within a part, the first
// `rotary_dims` dims rotate in pairs and the rest pass through (freq < 0).
struct RotarySlot {
  int partner;
  int freq;
  int stream;
  float sign;
};

__device__ inline RotarySlot
rotary_slot(int d, int head_dim, int rotary_dims, int streams, bool interleaved) {
  const int part_dims = head_dim / streams;
  const int stream = d / part_dims;
  const int e = d - stream * part_dims;
  RotarySlot slot = {d, -1, stream, 0.0f};
  if (e >= rotary_dims) {
    return slot;
  }
  const int half_dims = rotary_dims / 2;
  const bool first = interleaved ? (e % 2 == 0) : (e < half_dims);
  slot.freq = interleaved ? e / 2 : e % half_dims;
  slot.partner = interleaved ? (first ? d + 1 : d - 1) : (first ? d + half_dims : d - half_dims);
  slot.sign = first ? -1.0f : 1.0f;
  return slot;
}

// Offset of row (b, l) of stream 0 in a (streams, batch or 1, L, R/2) table; a batch of 1 broadcasts.
template <typename TableShape>
__device__ inline int64_t table_row(TableShape table_shape, int b, int l) {
  const int table_batch = table_shape[1] == 1 ? 0 : b;
  return (int64_t(table_batch) * table_shape[2] + l) * table_shape[3];
}

// Element (b, h, l, d) of a row-major (batch, heads, L, D) tensor at flat `index`.
struct RopeElement {
  int b;
  int h;
  int l;
  int d;
};

__device__ inline RopeElement element_at(uint32_t index, int heads, int length, int head_dim) {
  RopeElement e;
  e.d = index % head_dim;
  e.l = (index / head_dim) % length;
  e.h = (index / head_dim / length) % heads;
  e.b = index / head_dim / length / heads;
  return e;
}

// Dim d of one head row of batch row b and token l, rotated in fp32: x_d cos + sign x_partner sin
// (pair (a, b): a cos - b sin, b cos + a sin), by the (streams, batch or 1, L, R/2) tables.
template <typename Row, typename Table, typename TableShape>
__device__ inline float rotated(
    Row row,
    int64_t dim_stride,
    int d,
    int head_dim,
    int rotary_dims,
    bool interleaved,
    Table cos_table,
    Table sin_table,
    TableShape table_shape,
    int b,
    int l) {
  const RotarySlot slot = rotary_slot(d, head_dim, rotary_dims, table_shape[0], interleaved);
  const float value = static_cast<float>(row[d * dim_stride]);
  if (slot.freq < 0) {
    return value;
  }
  const int64_t stream_stride = int64_t(table_shape[1]) * table_shape[2] * table_shape[3];
  const int64_t at = table_row(table_shape, b, l) + slot.stream * stream_stride + slot.freq;
  const float partner = static_cast<float>(row[slot.partner * dim_stride]);
  return value * cos_table[at] + slot.sign * partner * sin_table[at];
}

//@ rope
// One thread per element of x (B, H, L, D) -> out, contiguous (B, H, L, D).
const uint32_t index = blockIdx.x * blockDim.x + threadIdx.x;
const int heads = x_shape[1];
const int length = x_shape[2];
const int head_dim = x_shape[3];
if (index >= uint32_t(x_shape[0]) * heads * length * head_dim) {
  return;
}
const RopeElement e = element_at(index, heads, length, head_dim);
out[index] = static_cast<T>(rotated(
    x + e.b * x_strides[0] + e.h * x_strides[1] + e.l * x_strides[2], x_strides[3], e.d, head_dim,
    2 * cos_table_shape[3], INTERLEAVED, cos_table, sin_table, cos_table_shape, e.b, e.l));

//@ rope_qk
// One thread per element of q (B, Hq, L, D) and k (B, Hk, L, D), heads of q first.
const uint32_t index = blockIdx.x * blockDim.x + threadIdx.x;
const int q_heads = q_shape[1];
const int heads = q_heads + k_shape[1];
const int length = q_shape[2];
const int head_dim = q_shape[3];
if (index >= uint32_t(q_shape[0]) * heads * length * head_dim) {
  return;
}
const RopeElement e = element_at(index, heads, length, head_dim);
const int rotary_dims = 2 * cos_table_shape[3];
if (e.h < q_heads) {
  q_out[((int64_t(e.b) * q_heads + e.h) * length + e.l) * head_dim + e.d] = static_cast<T>(rotated(
      q + e.b * q_strides[0] + e.h * q_strides[1] + e.l * q_strides[2], q_strides[3], e.d, head_dim,
      rotary_dims, INTERLEAVED, cos_table, sin_table, cos_table_shape, e.b, e.l));
} else {
  const int kh = e.h - q_heads;
  k_out[((int64_t(e.b) * (heads - q_heads) + kh) * length + e.l) * head_dim + e.d] = static_cast<T>(rotated(
      k + e.b * k_strides[0] + kh * k_strides[1] + e.l * k_strides[2], k_strides[3], e.d, head_dim,
      rotary_dims, INTERLEAVED, cos_table, sin_table, cos_table_shape, e.b, e.l));
}
