// Fused AdamW over a flat fp32 shard (CPU): one pass that reads param, grad, exp_avg, exp_avg_sq
// and writes param, exp_avg, exp_avg_sq. Same arithmetic, in the same order, as torch.optim.AdamW
// (single-tensor path):
//   p   *= 1 - lr * wd
//   m   += (1 - b1) * (g - m)                 (torch's lerp)
//   v    = b2 * v + (1 - b2) * g * g
//   p   -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//
// Registered as megatron_ds::fused_adamw_ (schema below; the CUDA file adds its CUDA kernel).
// The extension is loaded with torch.ops.load_library, so this file defines no Python module.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

namespace {

using Vec = at::vec::Vectorized<float>;

void adamw_chunk(float* p, const float* g, float* m, float* v, int64_t n, float decay, float b1, float b2,
                 float one_minus_b1, float one_minus_b2, float step_size, float bc2_sqrt, float eps) {
  int64_t i = 0;
  const Vec vdecay(decay), vb2(b2), vomb1(one_minus_b1), vomb2(one_minus_b2);
  const Vec vstep(step_size), vbc2(bc2_sqrt), veps(eps);
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec pv = Vec::loadu(p + i) * vdecay;
    Vec gv = Vec::loadu(g + i);
    Vec mv = Vec::loadu(m + i);
    mv = mv + vomb1 * (gv - mv);
    Vec vv = Vec::loadu(v + i) * vb2 + vomb2 * gv * gv;
    Vec denom = vv.sqrt() / vbc2 + veps;
    pv = pv - vstep * (mv / denom);
    pv.store(p + i);
    mv.store(m + i);
    vv.store(v + i);
  }
  for (; i < n; ++i) {
    float pi = p[i] * decay;
    float gi = g[i];
    float mi = m[i] + one_minus_b1 * (gi - m[i]);
    float vi = v[i] * b2 + one_minus_b2 * gi * gi;
    pi -= step_size * (mi / (std::sqrt(vi) / bc2_sqrt + eps));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
  (void)b1;
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fused_adamw_: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fused_adamw_: ", name, " must be contiguous");
  TORCH_CHECK(t.numel() == like.numel(), "fused_adamw_: ", name, " has ", t.numel(), " elements, param has ",
              like.numel());
  TORCH_CHECK(t.device() == like.device(), "fused_adamw_: ", name, " is on ", t.device(), ", param on ",
              like.device());
}

void fused_adamw_cpu(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                     double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  check(param, param, "param");
  check(grad, param, "grad");
  check(exp_avg, param, "exp_avg");
  check(exp_avg_sq, param, "exp_avg_sq");
  TORCH_CHECK(step >= 1, "fused_adamw_: step is 1-based, got ", step);
  // Scalars computed as torch does: bias corrections in double, then used as float.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  // 32K elements per task: big enough to amortize the thread hand-off, small enough to balance.
  at::parallel_for(0, param.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    adamw_chunk(p + begin, g + begin, m + begin, v + begin, end - begin, decay, static_cast<float>(beta1),
                static_cast<float>(beta2), static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                step_size, bc2_sqrt, static_cast<float>(eps));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron_ds, m) {
  m.def(
      "fused_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, int step) -> ()");
}

TORCH_LIBRARY_IMPL(megatron_ds, CPU, m) {
  m.impl("fused_adamw_", &fused_adamw_cpu);
}
