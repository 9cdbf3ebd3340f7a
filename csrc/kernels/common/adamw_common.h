// AdamW pieces shared by the CPU kernel (csrc/kernels/cpu/adamw.cpp) and the CUDA kernel
// (csrc/kernels/cuda/adamw.cu): the argument checks, the step's scalars and the per-element
// update, the same arithmetic in the same order as torch.optim.AdamW (single-tensor path):
//   p   *= 1 - lr * wd
//   m   += (1 - b1) * (g - m)                 (torch's lerp)
//   v    = b2 * v + (1 - b2) * g * g
//   p   -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace megatron_ds {

struct AdamWScalars {
  float decay, b2, one_minus_b1, one_minus_b2, step_size, bc2_sqrt, eps;
};

// The step's scalars as torch computes them: bias corrections in double, then used as float.
inline AdamWScalars adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                  int64_t step) {
  TORCH_CHECK(step >= 1, "fused_adamw_: step is 1-based, got ", step);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return {static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(beta2), static_cast<float>(1.0 - beta1),
          static_cast<float>(1.0 - beta2), static_cast<float>(lr / bc1), static_cast<float>(std::sqrt(bc2)),
          static_cast<float>(eps)};
}

C10_HOST_DEVICE inline void adamw_one(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  p *= s.decay;
  m = m + s.one_minus_b1 * (g - m);
  v = v * s.b2 + s.one_minus_b2 * g * g;
  p -= s.step_size * (m / (sqrtf(v) / s.bc2_sqrt + s.eps));
}

// param, grad, exp_avg, exp_avg_sq: contiguous fp32 tensors of one size on one device.
inline void check_adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                             const at::Tensor& exp_avg_sq) {
  const std::pair<const at::Tensor*, const char*> args[] = {
      {&param, "param"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  for (const auto& [t, name] : args) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "fused_adamw_: ", name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous(), "fused_adamw_: ", name, " must be contiguous");
    TORCH_CHECK(t->numel() == param.numel(), "fused_adamw_: ", name, " has ", t->numel(), " elements, param has ",
                param.numel());
    TORCH_CHECK(t->device() == param.device(), "fused_adamw_: ", name, " is on ", t->device(), ", param on ",
                param.device());
  }
}

}  // namespace megatron_ds
