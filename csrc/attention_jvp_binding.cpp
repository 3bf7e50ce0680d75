// PyTorch binding of the fused attention JVP (built on first use by fewstep/kernels/cuda.py). Only torch/extension.h:
// the caller passes the current CUDA stream and has made q's device current, so this file also syntax-checks
// against a CPU build of torch.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "attention_jvp_params.h"

namespace {

void strides3(const torch::Tensor& t, int64_t* out) {
  for (int i = 0; i < 3; ++i) out[i] = t.stride(i);
}

// A layout the kernel can address by strides: last dimension contiguous, no overlapping (expanded) dimensions.
torch::Tensor kernel_layout(const torch::Tensor& t) {
  return t.stride(-1) == 1 && t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

}  // namespace

// q [B, H, Lq, D], k and v [B, H, Lk, D]; tangents of the same shapes or None (primal only); mask broadcastable to
// [B, H, Lq, Lk], bool (True = attend) or additive. Returns [out, out_t (undefined when primal only), lse].
std::vector<torch::Tensor> attention_jvp(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         c10::optional<torch::Tensor> dq, c10::optional<torch::Tensor> dk,
                                         c10::optional<torch::Tensor> dv, c10::optional<torch::Tensor> mask,
                                         double scale, int64_t stream) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "attention_jvp: tensors must be on a CUDA device");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_jvp: q, k, v must be [B, H, L, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "attention_jvp: dtypes differ");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "attention_jvp: head dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK(k.size(3) == head_dim && v.size(3) == head_dim, "attention_jvp: k and v need the head dim of q");
  TORCH_CHECK(k.size(2) == v.size(2), "attention_jvp: k and v lengths differ");
  const bool with_tangent = dq.has_value();
  TORCH_CHECK(dk.has_value() == with_tangent && dv.has_value() == with_tangent, "attention_jvp: pass all tangents or none");

  q = kernel_layout(q); k = kernel_layout(k); v = kernel_layout(v);
  torch::Tensor tq, tk, tv;
  if (with_tangent) {
    // The kernel reads a tangent with its primal's strides: copy each into a tensor laid out like the primal.
    tq = torch::empty_like(q).copy_(*dq);
    tk = torch::empty_like(k).copy_(*dk);
    tv = torch::empty_like(v).copy_(*dv);
  }
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  auto out = torch::empty({B, H, Lq, head_dim}, q.options());
  auto out_t = with_tangent ? torch::empty_like(out) : torch::Tensor();
  auto lse = torch::empty({B, H, Lq}, q.options().dtype(torch::kFloat32));

  fewstep::AttnJvpParams p{};
  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.out = out.data_ptr(); p.lse = lse.data_ptr<float>();
  if (with_tangent) {
    p.dq = tq.data_ptr(); p.dk = tk.data_ptr(); p.dv = tv.data_ptr(); p.out_t = out_t.data_ptr();
  }
  strides3(q, p.q_stride); strides3(k, p.k_stride); strides3(v, p.v_stride); strides3(out, p.o_stride);
  torch::Tensor m;
  p.mask_kind = fewstep::kNoMask;
  if (mask.has_value()) {
    m = mask->to(q.device());
    if (m.scalar_type() == torch::kBool) {
      m = m.to(torch::kUInt8);
      p.mask_kind = fewstep::kBoolMask;
    } else {
      m = m.to(torch::kFloat32);
      p.mask_kind = fewstep::kAdditiveMask;
    }
    while (m.dim() < 4) m = m.unsqueeze(0);
    m = m.expand({B, H, Lq, Lk});  // broadcast dims get stride 0: no copy
    p.mask = m.data_ptr();
    for (int i = 0; i < 4; ++i) p.mask_stride[i] = m.stride(i);
  }
  p.batch = static_cast<int>(B); p.heads = static_cast<int>(H);
  p.len_q = static_cast<int>(Lq); p.len_k = static_cast<int>(Lk);
  p.scale = static_cast<float>(scale);
  const int dtype = q.scalar_type() == torch::kFloat32 ? 0 : q.scalar_type() == torch::kFloat16 ? 1
                  : q.scalar_type() == torch::kBFloat16 ? 2 : -1;
  TORCH_CHECK(dtype >= 0, "attention_jvp: dtype must be float32, float16 or bfloat16");
  const int err = fewstep_attention_jvp(&p, dtype, static_cast<int>(head_dim), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "attention_jvp: kernel launch failed with CUDA error ", err);
  return {out, out_t, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_jvp", &attention_jvp, "Fused attention forward + JVP (fewstep)");
}
