// The Metal prelude of the kernels (for mx.fast.metal_kernel): what the shared kernel text (*.inc)
// names, spelled in Metal. prelude.cu defines the same names, in the same order, for CUDA;
// tests/kernel_compile.py's `assert_one_algorithm` checks that they do and that the shared text
// names nothing of either platform, so the CUDA kernels' compile checks and emulated runs are
// evidence for the Metal ones. `header` goes before every kernel's helpers, `indices` starts every
// kernel body: MLX adds a thread attribute to the kernel's signature where the body names it, so
// the indices are read there, not in the header. Simdgroups are 32 wide here, as warps are.

//@ header
#define DEVICE inline
#define SHARED threadgroup
#define NEG_INF (-metal::numeric_limits<float>::infinity())

inline float warp_shuffle(float value, int lane) {
  return metal::simd_shuffle(value, static_cast<ushort>(lane));
}

inline float warp_shuffle_xor(float value, int lane_mask) {
  return metal::simd_shuffle_xor(value, static_cast<ushort>(lane_mask));
}

// A lane past the simdgroup's end keeps its own value.
inline uint32_t warp_shuffle_down(uint32_t value, int delta) {
  return metal::simd_shuffle_down(value, static_cast<ushort>(delta));
}

inline float warp_max(float value) {
  return metal::simd_max(value);
}

inline void block_barrier() {
  metal::threadgroup_barrier(metal::mem_flags::mem_threadgroup);
}

inline float min_f32(float a, float b) {
  return metal::min(a, b);
}

inline float max_f32(float a, float b) {
  return metal::max(a, b);
}

inline float abs_f32(float x) {
  return metal::abs(x);
}

// Half away from zero, as CUDA's roundf.
inline float round_f32(float x) {
  return metal::round(x);
}

inline float exp_f32(float x) {
  return metal::exp(x);
}

inline float tanh_f32(float x) {
  return metal::precise::tanh(x);
}

//@ indices
  const uint32_t grid_thread = thread_position_in_grid.x;
  const int block_x = static_cast<int>(threadgroup_position_in_grid.x);
  const int block_y = static_cast<int>(threadgroup_position_in_grid.y);
  const int block_z = static_cast<int>(threadgroup_position_in_grid.z);
  const int block_thread = static_cast<int>(thread_index_in_threadgroup);
  const int lane = static_cast<int>(thread_index_in_simdgroup);
  const int warp = static_cast<int>(simdgroup_index_in_threadgroup);
  (void)grid_thread, (void)block_x, (void)block_y, (void)block_z, (void)block_thread, (void)lane, (void)warp;

