// The quantizing cache's write, for mx.fast.cuda_kernel (see kv_write.py for the launchers), after the
// rotation helpers of rope.cu's header. Twin of kv_write.metal, line for line (see rope.cu).
//
// Template parameters: T (the tensors' dtype), INTERLEAVED (pairs (2i, 2i+1) instead of
// (i, i + R/2)), ROTATE (false: the keys come rotated), BITS (4 or 8) and GROUP_SIZE (32 or 64).

//@ header
// A group of 32 * V values, V per lane of one simdgroup (warp), quantized as MLX's GPU
// affine_quantize does: w_max starts at 0 (its CPU twin starts at -inf), the scale is anchored at
// the edge of larger magnitude, codes are round-half-away and clipped to 2^BITS - 1.
template <int V>
struct LaneValues {
  float at[V];
};

struct AffineGroup {
  float scale;
  float bias;
  uint32_t word;  // the packed word this lane writes if it leads one (lane % (32 / BITS / V) == 0)
};

template <int BITS, int V>
__device__ inline AffineGroup affine_quantize_lanes(LaneValues<V> values) {
  constexpr float n_bins = (1 << BITS) - 1;
  constexpr int lanes_per_word = 32 / BITS / V;
  float w_min = values.at[0];
  float w_max = 0.0f;
  for (int i = 0; i < V; i++) {
    w_min = min(w_min, values.at[i]);
    w_max = max(w_max, values.at[i]);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    w_min = min(w_min, __shfl_xor_sync(0xffffffffu, w_min, offset));
    w_max = max(w_max, __shfl_xor_sync(0xffffffffu, w_max, offset));
  }
  float scale = max((w_max - w_min) / n_bins, 1e-7f);
  const bool side = fabsf(w_min) > fabsf(w_max);
  scale = side ? scale : -scale;
  const float edge = side ? w_min : w_max;
  const float q0 = roundf(edge / scale);
  const bool at_zero = q0 == 0.0f;
  AffineGroup group;
  group.scale = at_zero ? scale : edge / q0;
  group.bias = at_zero ? 0.0f : edge;
  uint32_t mine = 0;
  for (int i = 0; i < V; i++) {
    const float code = min(roundf((values.at[i] - group.bias) / group.scale), n_bins);
    mine |= static_cast<uint32_t>(code) << (BITS * i);
  }
  group.word = 0;
  for (int j = 0; j < lanes_per_word; j++) {
    group.word |= __shfl_down_sync(0xffffffffu, mine, j) << (BITS * V * j);
  }
  return group;
}

//@ rope_kv_block
// One simdgroup (warp) per quantization group: key group (b, h, channel d, block of GROUP_SIZE
// tokens) of the rotated keys, and value group (b, h, token, GROUP_SIZE head dims), as many of each.
// Lane i holds the V = GROUP_SIZE / 32 consecutive elements i*V .. i*V+V-1 of both groups.
constexpr int V = GROUP_SIZE / 32;
constexpr int words_per_group = GROUP_SIZE * BITS / 32;
const uint32_t group = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
const int lane = threadIdx.x % 32;
const int heads = k_shape[1];
const int length = k_shape[2];
const int head_dim = k_shape[3];
const int blocks = length / GROUP_SIZE;
if (group >= uint32_t(k_shape[0]) * heads * blocks * head_dim) {
  return;
}
// Keys already rotated (ROTATE false) pass through whole: no dim rotates, no table is read.
const int rotary_dims = ROTATE ? 2 * cos_table_shape[3] : 0;
// Keys: channel fastest, so neighbouring simdgroups (warps) read neighbouring addresses.
const int d = group % head_dim;
const int block = (group / head_dim) % blocks;
const int kbh = group / head_dim / blocks;
LaneValues<V> keys;
for (int i = 0; i < V; i++) {
  const int l = block * GROUP_SIZE + lane * V + i;
  // Rounded to T first: the cache quantizes the rotated keys as stored in its dtype.
  keys.at[i] = static_cast<float>(static_cast<T>(rotated(
      k + (kbh / heads) * k_strides[0] + (kbh % heads) * k_strides[1] + l * k_strides[2], k_strides[3], d, head_dim,
      rotary_dims, INTERLEAVED, cos_table, sin_table, cos_table_shape, kbh / heads, l)));
}
const AffineGroup key_group = affine_quantize_lanes<BITS, V>(keys);
const int64_t key_row = int64_t(kbh) * head_dim + d;
if (lane % (32 / BITS / V) == 0) {
  k_data[key_row * blocks * words_per_group + block * words_per_group + lane / (32 / BITS / V)] = key_group.word;
}
if (lane == 0) {
  k_scales[key_row * blocks + block] = static_cast<T>(key_group.scale);
  k_biases[key_row * blocks + block] = static_cast<T>(key_group.bias);
}
// Values: per token, over GROUP_SIZE consecutive head dims.
const int value_groups = head_dim / GROUP_SIZE;
const int g = group % value_groups;
const int l = (group / value_groups) % length;
const int vbh = group / value_groups / length;
LaneValues<V> values;
for (int i = 0; i < V; i++) {
  values.at[i] = static_cast<float>(
      v[(vbh / heads) * v_strides[0] + (vbh % heads) * v_strides[1] + l * v_strides[2]
        + (g * GROUP_SIZE + lane * V + i) * v_strides[3]]);
}
const AffineGroup value_group = affine_quantize_lanes<BITS, V>(values);
const int64_t value_row = int64_t(vbh) * length + l;
if (lane % (32 / BITS / V) == 0) {
  v_data[value_row * value_groups * words_per_group + g * words_per_group + lane / (32 / BITS / V)] = value_group.word;
}
if (lane == 0) {
  v_scales[value_row * value_groups + g] = static_cast<T>(value_group.scale);
  v_biases[value_row * value_groups + g] = static_cast<T>(value_group.bias);
}
