// Parameters of the fused attention JVP launcher, shared by the kernel (attention_jvp.cuh) and the binding.
#pragma once

#include <stdint.h>

namespace fewstep {

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAdditiveMask = 2 };

struct AttnJvpParams {
  // [B, H, L, D] tensors addressed by (batch, head, row) strides in elements; the last dimension is contiguous.
  // Tangents share the strides of their primal (q̇ those of q, ...).
  const void* q; const void* k; const void* v;
  const void* dq; const void* dk; const void* dv;  // all null: primal only
  void* out; void* out_t;                            // out_t null when primal only
  float* lse;                                        // [B, H, Lq] contiguous
  const void* mask;                                  // uint8 (bool) or float32, 4-D strides (0 = broadcast)
  int mask_kind;
  int64_t q_stride[3], k_stride[3], v_stride[3], o_stride[3], mask_stride[4];
  int batch, heads, len_q, len_k;
  float scale;
};

}  // namespace fewstep

// dtype: 0 = float32, 1 = float16, 2 = bfloat16; head_dim 64 or 128. Returns a cudaError_t (0 = success).
extern "C" int fewstep_attention_jvp(const fewstep::AttnJvpParams* params, int dtype, int head_dim, void* stream);
