// C launcher for the fused attention JVP kernel (attention_jvp.cuh). No PyTorch headers: `nvcc -c` alone
// compile-checks this file; attention_jvp_binding.cpp wraps it for torch.
#include "attention_jvp.cuh"

namespace fewstep {

constexpr int kWarps = 4;
constexpr int kRows = 4;

template <typename scalar_t, int D, bool WITH_TANGENT>
static cudaError_t launch(const AttnJvpParams& p, cudaStream_t stream) {
  constexpr int block_n = D >= 128 ? 16 : 32;  // 4 float tiles of block_n × D: 32 KiB of shared memory
  const int block_m = kRows * kWarps;
  const size_t smem = static_cast<size_t>((WITH_TANGENT ? 4 : 2) * block_n * D) * sizeof(float);
  dim3 grid((p.len_q + block_m - 1) / block_m, p.batch * p.heads);
  attention_jvp_kernel<scalar_t, D, kRows, kWarps, block_n, WITH_TANGENT><<<grid, kWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename scalar_t, int D>
static cudaError_t launch_tangent(const AttnJvpParams& p, cudaStream_t stream) {
  return p.dq != nullptr ? launch<scalar_t, D, true>(p, stream) : launch<scalar_t, D, false>(p, stream);
}

template <typename scalar_t>
static cudaError_t launch_dim(const AttnJvpParams& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch_tangent<scalar_t, 64>(p, stream);
    case 128: return launch_tangent<scalar_t, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace fewstep

// dtype: 0 = float32, 1 = float16, 2 = bfloat16. Returns a cudaError_t (0 = success).
extern "C" int fewstep_attention_jvp(const fewstep::AttnJvpParams* params, int dtype, int head_dim, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return static_cast<int>(fewstep::launch_dim<float>(*params, head_dim, s));
    case 1: return static_cast<int>(fewstep::launch_dim<__half>(*params, head_dim, s));
    case 2: return static_cast<int>(fewstep::launch_dim<__nv_bfloat16>(*params, head_dim, s));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
