// Fused attention forward + JVP, one tiled pass with an online softmax.
//
//   S = κ·Q·Kᵀ + M,  P = softmax(S),  O = P·V
//   Ṡ = κ·(Q̇·Kᵀ + Q·K̇ᵀ),  Ȯ = P·V̇ + (P⊙Ṡ)·V − diag(rowsum(P⊙Ṡ))·O
//
// Per query row the kernel keeps the running max m, the normaliser ℓ and three accumulators:
//   A = Σ e^{S−m}·V,  T = Σ e^{S−m}·(V̇ + Ṡ·V),  r = Σ e^{S−m}·Ṡ
// and finishes with O = A/ℓ, Ȯ = T/ℓ − (r/ℓ)·O, lse = m + log ℓ. Nothing of size L_q × L_k is stored.
//
// Work split: one warp owns ROWS query rows; lane l holds the head-dim elements d = l + 32·e (e < D/32) of each
// row's q, q̇, A and T. Key/value tiles (and their tangents) are staged in shared memory as float and shared by
// the WARPS warps of a block. A dot product is a lane-partial sum plus a butterfly reduction, so every lane ends
// with the same score and the softmax bookkeeping is warp-uniform (no divergence).
//
// Masks: none, boolean (nonzero = attend) or additive float, read through 4-D strides so broadcast masks need no
// copy. A row whose keys are all masked ends with ℓ = 0 and is written as O = Ȯ = 0, lse = −inf (no NaN/inf).
// Large logits are safe: every exponent is S − m ≤ 0.
//
// This header has no PyTorch dependency; attention_jvp.cu instantiates it behind a plain C launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include "attention_jvp_params.h"

namespace fewstep {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// D: head dim (multiple of 32). ROWS: query rows per warp. WARPS: warps per block. BLOCK_N: keys per shared tile.
template <typename scalar_t, int D, int ROWS, int WARPS, int BLOCK_N, bool WITH_TANGENT>
__global__ void __launch_bounds__(WARPS * 32) attention_jvp_kernel(const AttnJvpParams p) {
  constexpr int EPL = D / 32;  // head-dim elements per lane
  constexpr int BLOCK_M = ROWS * WARPS;
  extern __shared__ float smem[];
  float* k_tile = smem;                         // [BLOCK_N][D]
  float* v_tile = k_tile + BLOCK_N * D;         // [BLOCK_N][D]
  float* dk_tile = v_tile + BLOCK_N * D;        // [BLOCK_N][D] (tangent only)
  float* dv_tile = dk_tile + BLOCK_N * D;       // [BLOCK_N][D] (tangent only)

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int row0 = blockIdx.x * BLOCK_M + warp * ROWS;

  const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const scalar_t* dq = WITH_TANGENT ? static_cast<const scalar_t*>(p.dq) + b * p.q_stride[0] + h * p.q_stride[1] : nullptr;
  const scalar_t* dk = WITH_TANGENT ? static_cast<const scalar_t*>(p.dk) + b * p.k_stride[0] + h * p.k_stride[1] : nullptr;
  const scalar_t* dv = WITH_TANGENT ? static_cast<const scalar_t*>(p.dv) + b * p.v_stride[0] + h * p.v_stride[1] : nullptr;

  float q_r[ROWS][EPL], dq_r[ROWS][EPL], acc[ROWS][EPL], acc_t[ROWS][EPL];
  float m[ROWS], ell[ROWS], r[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = row0 + i;
    m[i] = -CUDART_INF_F; ell[i] = 0.f; r[i] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      const int d = lane + 32 * e;
      q_r[i][e] = row < p.len_q ? to_float(q[row * p.q_stride[2] + d]) : 0.f;
      dq_r[i][e] = (WITH_TANGENT && row < p.len_q) ? to_float(dq[row * p.q_stride[2] + d]) : 0.f;
      acc[i][e] = 0.f; acc_t[i][e] = 0.f;
    }
  }

  for (int k0 = 0; k0 < p.len_k; k0 += BLOCK_N) {
    const int n_keys = min(BLOCK_N, p.len_k - k0);
    __syncthreads();  // the previous tile is no longer read
    for (int idx = threadIdx.x; idx < BLOCK_N * D; idx += WARPS * 32) {
      const int j = idx / D, d = idx % D;
      const bool in = j < n_keys;
      k_tile[idx] = in ? to_float(k[(k0 + j) * p.k_stride[2] + d]) : 0.f;
      v_tile[idx] = in ? to_float(v[(k0 + j) * p.v_stride[2] + d]) : 0.f;
      if (WITH_TANGENT) {
        dk_tile[idx] = in ? to_float(dk[(k0 + j) * p.k_stride[2] + d]) : 0.f;
        dv_tile[idx] = in ? to_float(dv[(k0 + j) * p.v_stride[2] + d]) : 0.f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int row = row0 + i;
      if (row >= p.len_q) continue;  // warp-uniform
      for (int j = 0; j < n_keys; ++j) {
        float s_part = 0.f, st_part = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          const int d = lane + 32 * e;
          const float kd = k_tile[j * D + d];
          s_part += q_r[i][e] * kd;
          if (WITH_TANGENT) st_part += dq_r[i][e] * kd + q_r[i][e] * dk_tile[j * D + d];
        }
        float s = warp_sum(s_part) * p.scale;
        const float s_t = WITH_TANGENT ? warp_sum(st_part) * p.scale : 0.f;
        if (p.mask_kind != kNoMask) {
          const int64_t mo = b * p.mask_stride[0] + h * p.mask_stride[1] + (int64_t)row * p.mask_stride[2] +
                             (int64_t)(k0 + j) * p.mask_stride[3];
          if (p.mask_kind == kBoolMask) {
            if (static_cast<const uint8_t*>(p.mask)[mo] == 0) continue;  // masked key: p = 0
          } else {
            s += static_cast<const float*>(p.mask)[mo];
            if (s == -CUDART_INF_F) continue;
          }
        }
        if (s > m[i]) {  // new running max: rescale the accumulators once (exponent ≤ 0, 0 on the first key)
          const float alpha = __expf(m[i] - s);
          ell[i] *= alpha;
          if (WITH_TANGENT) r[i] *= alpha;
#pragma unroll
          for (int e = 0; e < EPL; ++e) { acc[i][e] *= alpha; if (WITH_TANGENT) acc_t[i][e] *= alpha; }
          m[i] = s;
        }
        const float pj = __expf(s - m[i]);
        ell[i] += pj;
        if (WITH_TANGENT) r[i] += pj * s_t;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          const int d = lane + 32 * e;
          const float vd = v_tile[j * D + d];
          acc[i][e] += pj * vd;
          if (WITH_TANGENT) acc_t[i][e] += pj * (dv_tile[j * D + d] + s_t * vd);
        }
      }
    }
  }

  scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1];
  scalar_t* out_t = WITH_TANGENT ? static_cast<scalar_t*>(p.out_t) + b * p.o_stride[0] + h * p.o_stride[1] : nullptr;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = row0 + i;
    if (row >= p.len_q) continue;
    const bool empty = ell[i] == 0.f;  // every key masked
    const float inv = empty ? 0.f : 1.f / ell[i];
#pragma unroll
    for (int e = 0; e < EPL; ++e) {
      const int d = lane + 32 * e;
      const float o = acc[i][e] * inv;
      out[row * p.o_stride[2] + d] = from_float<scalar_t>(o);
      if (WITH_TANGENT) out_t[row * p.o_stride[2] + d] = from_float<scalar_t>(acc_t[i][e] * inv - r[i] * inv * o);
    }
    if (lane == 0) p.lse[((int64_t)b * p.heads + h) * p.len_q + row] = empty ? -CUDART_INF_F : m[i] + logf(ell[i]);
  }
}

}  // namespace fewstep
