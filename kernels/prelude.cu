// The CUDA prelude of the kernels (for mx.fast.cuda_kernel): what the shared kernel text (*.inc)
// names, spelled in CUDA. prelude.metal defines the same names, in the same order, for Metal;
// tests/kernel_compile.py's `assert_one_algorithm` checks that they do and that the shared text
// names nothing of either platform, so the CUDA kernels' compile checks and emulated runs are
// evidence for the Metal ones. `header` goes before every kernel's helpers, `indices` starts every
// kernel body (a block is a threadgroup on Metal, a warp a 32-lane simdgroup).

//@ header
#define DEVICE __device__ inline
#define SHARED __shared__
#define NEG_INF (-cuda::std::numeric_limits<float>::infinity())

__device__ __forceinline__ float warp_shuffle(float value, int lane) {
  return __shfl_sync(0xffffffffu, value, lane);
}

__device__ __forceinline__ float warp_shuffle_xor(float value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

// A lane past the warp's end keeps its own value.
__device__ __forceinline__ uint32_t warp_shuffle_down(uint32_t value, int delta) {
  return __shfl_down_sync(0xffffffffu, value, delta);
}

__device__ __forceinline__ float warp_max(float value) {
  for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) {
    value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, lane_mask));
  }
  return value;
}

__device__ __forceinline__ void block_barrier() {
  __syncthreads();
}

__device__ __forceinline__ float min_f32(float a, float b) {
  return fminf(a, b);
}

__device__ __forceinline__ float max_f32(float a, float b) {
  return fmaxf(a, b);
}

__device__ __forceinline__ float abs_f32(float x) {
  return fabsf(x);
}

// Half away from zero, as Metal's round.
__device__ __forceinline__ float round_f32(float x) {
  return roundf(x);
}

__device__ __forceinline__ float exp_f32(float x) {
  return expf(x);
}

__device__ __forceinline__ float tanh_f32(float x) {
  return tanhf(x);
}

//@ indices
  const uint32_t grid_thread = blockIdx.x * blockDim.x + threadIdx.x;
  const int block_x = blockIdx.x;
  const int block_y = blockIdx.y;
  const int block_z = blockIdx.z;
  const int block_thread = threadIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  (void)grid_thread, (void)block_x, (void)block_y, (void)block_z, (void)block_thread, (void)lane, (void)warp;

