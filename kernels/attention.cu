// GQA attention for decode and short query chunks, CUDA source for mx.fast.cuda_kernel.
//
// Twin of attention.metal: the two kernel bodies are the same text, line for line, except the
// block each marks "platform-specific" (thread indices and shared-memory declarations); the
// platform's warp, barrier and math operations sit behind the helpers of the header section.
// tests/test_kernels_attention.py checks that the bodies agree. What the kernels compute, their
// inputs and their launch are documented in attention.py, which reads the sections below.
//
// Template parameters (both sources): T the queries' and cache's float type, D head_dim, ROWS the
// block's query rows (query heads of the group x queries) rounded up to a power of 2. The packing
// (bits 4/8, or 0 for plain keys and values, and the group size) is read at run time: it costs a
// few integer operations per packed word and keeps the instantiations (JIT compiles) few.

//@ header
__device__ constexpr float NEG_INF = -cuda::std::numeric_limits<float>::infinity();

__device__ __forceinline__ float warp_shuffle(float value, int lane) {
  return __shfl_sync(0xffffffffu, value, lane);
}

__device__ __forceinline__ float warp_shuffle_xor(float value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
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

__device__ __forceinline__ float max_f32(float a, float b) {
  return fmaxf(a, b);
}

__device__ __forceinline__ float exp_f32(float x) {
  return expf(x);
}

__device__ __forceinline__ float tanh_f32(float x) {
  return tanhf(x);
}

//@ attention_partial
  // One block per (batch row, kv head), split of the keys and block of ROWS query rows: with one
  // row block (decode, short chunks) it serves every query row of the kv head's group, so each key
  // and value is read once per group. Each warp runs an online
  // softmax over its own steps of STEP keys; the warps are merged at the end, and the block
  // writes its normalised output (one split) or its (max, sum, unnormalised output) partials.
  constexpr int WARPS = 4;
  constexpr int STEP = 64;
  // Scores: lane (col, slice) scores keys base + col * SPW .. + SPW - 1 (4 slots of one packed
  // word) over head_dim elements d = slice, slice + SLICES, ...
  constexpr int SPW = 4;
  constexpr int COLS = STEP / SPW;
  constexpr int SLICES = 32 / COLS;
  // p.v: lane accumulates head_dim elements lane * DPL .. + DPL - 1; lanes from VLANES on idle.
  constexpr int DPL = D <= 64 ? 2 : (D <= 128 ? 4 : 8);
  constexpr int VLANES = D / DPL;
  constexpr int CAUSAL = 1;
  constexpr int MASK = 2;
  constexpr int SOFTCAP = 4;

  // platform-specific: begin
  __shared__ float shared_rows[ROWS * D];
  __shared__ float stat_max[WARPS * ROWS];
  __shared__ float stat_sum[WARPS * ROWS];
  const int tid = threadIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int blockrow = blockIdx.x;
  const int split = blockIdx.y;
  const int row_block = blockIdx.z;
  // platform-specific: end

  const int n_packed = counts[0];
  const int n_tail = counts[1];
  const int kv_heads = counts[2];
  const int groups = counts[3];
  const int n_queries = counts[4];
  const int split_len = counts[5];
  const int n_splits = counts[6];
  const int flags = counts[7];
  const int bits = counts[8];
  const int group_size = counts[9];
  const float scale = factors[0];
  const float softcap = factors[1];
  const uint32_t low_bits = (1u << bits) - 1u;
  const int n_keys = n_packed + n_tail;
  // The group's rows (query head r / n_queries of the group, query r % n_queries), ROWS per block:
  // this block serves rows first_row .. first_row + block_rows - 1.
  const int n_rows = groups * n_queries;
  const int first_row = row_block * ROWS;
  const int block_rows = min(ROWS, n_rows - first_row);
  const int batch = blockrow / kv_heads;
  const int kv_head = blockrow % kv_heads;
  const int begin = split * split_len;
  const int end = min(begin + split_len, n_keys);

  // shared_rows holds the scaled queries (block row r is row first_row + r; padding rows are
  // zero), and after the key loop the block's merged outputs.
  for (int index = tid; index < ROWS * D; index += WARPS * 32) {
    const int r = index / D;
    const int d = index % D;
    float value = 0.0f;
    if (r < block_rows) {
      const int head = kv_head * groups + (first_row + r) / n_queries;
      const int query = (first_row + r) % n_queries;
      value = scale * static_cast<float>(q[batch * q_strides[0] + head * q_strides[1] + query * q_strides[2] + d * q_strides[3]]);
    }
    shared_rows[index] = value;
  }
  block_barrier();

  const int64_t k_data_base = batch * k_data_strides[0] + kv_head * k_data_strides[1];
  const int64_t k_scales_base = batch * k_scales_strides[0] + kv_head * k_scales_strides[1];
  const int64_t k_biases_base = batch * k_biases_strides[0] + kv_head * k_biases_strides[1];
  const int64_t k_tail_base = batch * k_tail_strides[0] + kv_head * k_tail_strides[1];
  const int64_t v_data_base = batch * v_data_strides[0] + kv_head * v_data_strides[1];
  const int64_t v_scales_base = batch * v_scales_strides[0] + kv_head * v_scales_strides[1];
  const int64_t v_biases_base = batch * v_biases_strides[0] + kv_head * v_biases_strides[1];
  const int64_t v_tail_base = batch * v_tail_strides[0] + kv_head * v_tail_strides[1];

  const int col = lane % COLS;
  const int slice = lane / COLS;
  // Lanes past VLANES (D = 80, 96) mirror the last one and never write.
  const int d0 = min(lane, VLANES - 1) * DPL;
  // A lane's DPL value elements share one scale group (DPL divides the group size).
  const int v_group = d0 / group_size;

  float row_max[ROWS];
  float row_sum[ROWS];
  float acc[ROWS][DPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    row_max[r] = NEG_INF;
    row_sum[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
      acc[r][e] = 0.0f;
    }
  }

  // The split's packed keys [begin, packed_end) then its tail keys [tail_begin, end), in steps of
  // STEP keys dealt to the warps in turn. Split bounds are multiples of STEP, so a packed step
  // starts on a word and every lane's SPW slots lie in one word and one scale group.
  const int packed_end = min(end, n_packed);
  const int packed_steps = packed_end > begin ? (packed_end - begin + STEP - 1) / STEP : 0;
  const int tail_begin = max(begin, n_packed);
  const int tail_steps = end > tail_begin ? (end - tail_begin + STEP - 1) / STEP : 0;
  for (int step = warp; step < packed_steps + tail_steps; step += WARPS) {
    const bool packed = step < packed_steps;
    const int base = packed ? begin + step * STEP : tail_begin + (step - packed_steps) * STEP;
    const int stop = packed ? packed_end : end;

    float score[ROWS][SPW];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int jj = 0; jj < SPW; ++jj) {
        score[r][jj] = 0.0f;
      }
    }
    if (packed) {
      // Keys are packed per channel: slot s of channel d is at bit (s * bits) % 32 of word
      // s * bits / 32. q.k = sum_d q[d] (scale[d] u[d] + bias[d]): the bias term is per lane.
      // Lanes past `stop` read the last word quarter again (their keys are masked below); packed
      // counts are multiples of SPW, so a quarter never straddles the end.
      const int first_key = min(base + col * SPW, stop - SPW);
      const int word = first_key * bits / 32;
      const int first_shift = first_key * bits % 32;
      const int group = first_key / group_size;
      float bias_dot[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        bias_dot[r] = 0.0f;
      }
      for (int t = 0; t < D / SLICES; ++t) {
        const int d = t * SLICES + slice;
        const uint32_t packed_word = k_data[k_data_base + d * k_data_strides[2] + word * k_data_strides[3]] >> first_shift;
        const float k_scale = static_cast<float>(k_scales[k_scales_base + d * k_scales_strides[2] + group * k_scales_strides[3]]);
        const float k_bias = static_cast<float>(k_biases[k_biases_base + d * k_biases_strides[2] + group * k_biases_strides[3]]);
        float k_levels[SPW];
#pragma unroll
        for (int jj = 0; jj < SPW; ++jj) {
          k_levels[jj] = static_cast<float>((packed_word >> (jj * bits)) & low_bits);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float q_d = shared_rows[r * D + d];
          const float q_scaled = q_d * k_scale;
          bias_dot[r] += q_d * k_bias;
#pragma unroll
          for (int jj = 0; jj < SPW; ++jj) {
            score[r][jj] += q_scaled * k_levels[jj];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int jj = 0; jj < SPW; ++jj) {
          score[r][jj] += bias_dot[r];
        }
      }
    } else {
      for (int t = 0; t < D / SLICES; ++t) {
        const int d = t * SLICES + slice;
#pragma unroll
        for (int jj = 0; jj < SPW; ++jj) {
          // Lanes past `stop` read the last key again (masked below).
          const int tail_row = min(base + col * SPW + jj, stop - 1) - n_packed;
          const float k_d = static_cast<float>(k_tail[k_tail_base + tail_row * k_tail_strides[2] + d * k_tail_strides[3]]);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            score[r][jj] += shared_rows[r * D + d] * k_d;
          }
        }
      }
    }
    // Sum the head_dim slices: afterwards the lanes of a column hold the same full scores.
#pragma unroll
    for (int lane_mask = COLS; lane_mask < 32; lane_mask *= 2) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int jj = 0; jj < SPW; ++jj) {
          score[r][jj] += warp_shuffle_xor(score[r][jj], lane_mask);
        }
      }
    }

    // Softcap, then the masks; then the online softmax: scores become p = exp(s - running max).
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      // Padding rows reuse the last real row's indices (their results are never written).
      const int real_row = first_row + min(r, block_rows - 1);
      const int head = kv_head * groups + real_row / n_queries;
      const int query = real_row % n_queries;
      float step_max = NEG_INF;
#pragma unroll
      for (int jj = 0; jj < SPW; ++jj) {
        const int key = base + col * SPW + jj;
        const int read_key = min(key, stop - 1);
        float s = score[r][jj];
        if (flags & SOFTCAP) {
          s = softcap * tanh_f32(s / softcap);
        }
        bool visible = key < stop;
        if (flags & CAUSAL) {
          visible = visible && key <= n_keys - n_queries + query;
        }
        if (flags & MASK) {
          s += mask[batch * mask_strides[0] + head * mask_strides[1] + query * mask_strides[2] + read_key * mask_strides[3]];
        }
        score[r][jj] = visible ? s : NEG_INF;
        step_max = max_f32(step_max, score[r][jj]);
      }
      const float new_max = max_f32(row_max[r], warp_max(step_max));
      // While every key so far is hidden the max is -inf: shift by 0 so exp gives 0, not NaN.
      const float shift = new_max == NEG_INF ? 0.0f : new_max;
      const float rescale = exp_f32(row_max[r] - shift);
      row_max[r] = new_max;
      row_sum[r] *= rescale;
#pragma unroll
      for (int e = 0; e < DPL; ++e) {
        acc[r][e] *= rescale;
      }
#pragma unroll
      for (int jj = 0; jj < SPW; ++jj) {
        score[r][jj] = exp_f32(score[r][jj] - shift);
      }
    }

    // p.v, lanes over head_dim: the weights of key base + c * SPW + jj come from lane c.
    for (int c = 0; c < COLS; ++c) {
#pragma unroll
      for (int jj = 0; jj < SPW; ++jj) {
        const int key = base + c * SPW + jj;
        if (key < stop) {
          float p[ROWS];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            p[r] = warp_shuffle(score[r][jj], c);
            row_sum[r] += p[r];
          }
          float value[DPL];
          if (packed) {
            // Values are packed per token: element d is at bit (d * bits) % 32 of word d * bits / 32.
            const float v_scale = static_cast<float>(v_scales[v_scales_base + key * v_scales_strides[2] + v_group * v_scales_strides[3]]);
            const float v_bias = static_cast<float>(v_biases[v_biases_base + key * v_biases_strides[2] + v_group * v_biases_strides[3]]);
#pragma unroll
            for (int e = 0; e < DPL; ++e) {
              const int bit = (d0 + e) * bits;
              const uint32_t packed_word = v_data[v_data_base + key * v_data_strides[2] + (bit / 32) * v_data_strides[3]];
              value[e] = v_scale * static_cast<float>((packed_word >> (bit % 32)) & low_bits) + v_bias;
            }
          } else {
#pragma unroll
            for (int e = 0; e < DPL; ++e) {
              value[e] = static_cast<float>(v_tail[v_tail_base + (key - n_packed) * v_tail_strides[2] + (d0 + e) * v_tail_strides[3]]);
            }
          }
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int e = 0; e < DPL; ++e) {
              acc[r][e] += p[r] * value[e];
            }
          }
        }
      }
    }
  }

  // Merge the warps: rescale each to the block's max and add them into shared_rows in warp order.
  block_barrier();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      stat_max[warp * ROWS + r] = row_max[r];
      stat_sum[warp * ROWS + r] = row_sum[r];
    }
  }
  block_barrier();
  float warp_rescale[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float block_max = NEG_INF;
    for (int w = 0; w < WARPS; ++w) {
      block_max = max_f32(block_max, stat_max[w * ROWS + r]);
    }
    warp_rescale[r] = exp_f32(row_max[r] - (block_max == NEG_INF ? 0.0f : block_max));
  }
  for (int w = 0; w < WARPS; ++w) {
    if (warp == w && lane < VLANES) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int e = 0; e < DPL; ++e) {
          const float previous = w == 0 ? 0.0f : shared_rows[r * D + d0 + e];
          shared_rows[r * D + d0 + e] = previous + acc[r][e] * warp_rescale[r];
        }
      }
    }
    block_barrier();
  }

  for (int index = tid; index < block_rows * D; index += WARPS * 32) {
    const int r = index / D;
    float block_max = NEG_INF;
    for (int w = 0; w < WARPS; ++w) {
      block_max = max_f32(block_max, stat_max[w * ROWS + r]);
    }
    const float shift = block_max == NEG_INF ? 0.0f : block_max;
    float total = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      total += stat_sum[w * ROWS + r] * exp_f32(stat_max[w * ROWS + r] - shift);
    }
    if (n_splits == 1) {
      out[(blockrow * n_rows + first_row) * D + index] = static_cast<T>(shared_rows[index] / total);
    } else {
      const int partial = (blockrow * n_splits + split) * n_rows + first_row + r;
      part_out[partial * D + index % D] = shared_rows[index];
      if (index % D == 0) {
        part_stats[partial * 2] = block_max;
        part_stats[partial * 2 + 1] = total;
      }
    }
  }

//@ attention_reduce
  // Merges the splits' partials of one output row (one block per row, one thread per element),
  // in split order: out = sum_s exp(max_s - M) out_s / sum_s exp(max_s - M) sum_s.

  // platform-specific: begin
  const int row = blockIdx.x;
  const int d = threadIdx.x;
  // platform-specific: end

  const int n_splits = part_stats_shape[1];
  const int n_rows = part_stats_shape[2];
  const int blockrow = row / n_rows;
  const int r = row % n_rows;
  float merged_max = NEG_INF;
  for (int s = 0; s < n_splits; ++s) {
    merged_max = max_f32(merged_max, part_stats[((blockrow * n_splits + s) * n_rows + r) * 2]);
  }
  const float shift = merged_max == NEG_INF ? 0.0f : merged_max;
  float total = 0.0f;
  float value = 0.0f;
  for (int s = 0; s < n_splits; ++s) {
    const int partial = (blockrow * n_splits + s) * n_rows + r;
    const float weight = exp_f32(part_stats[partial * 2] - shift);
    total += weight * part_stats[partial * 2 + 1];
    value += weight * part_out[partial * D + d];
  }
  out[row * D + d] = static_cast<T>(value / total);
