// Fused AdamW over a flat fp32 shard (CPU): one pass that reads param, grad, exp_avg, exp_avg_sq
// and writes param, exp_avg, exp_avg_sq, with torch.optim.AdamW's arithmetic in its order (the
// formulas, the step's scalars and the checks are in csrc/kernels/common/adamw_common.h, shared
// with the CUDA kernel).
//
// Registered as megatron_ds::fused_adamw_ (schema below; the CUDA file adds its CUDA kernel).
// The extension is loaded with torch.ops.load_library, so this file defines no Python module.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../common/adamw_common.h"

namespace {

using megatron_ds::AdamWScalars;
using Vec = at::vec::Vectorized<float>;

void adamw_chunk(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  int64_t i = 0;
  const Vec vdecay(s.decay), vb2(s.b2), vomb1(s.one_minus_b1), vomb2(s.one_minus_b2);
  const Vec vstep(s.step_size), vbc2(s.bc2_sqrt), veps(s.eps);
  for (; i + Vec::size() <= n; i += Vec::size()) {  // megatron_ds::adamw_one, W lanes at a time
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
  for (; i < n; ++i) megatron_ds::adamw_one(p[i], g[i], m[i], v[i], s);
}

void fused_adamw_cpu(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                     double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  megatron_ds::check_adamw_args(param, grad, exp_avg, exp_avg_sq);
  const AdamWScalars s = megatron_ds::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  // 32K elements per task: big enough to amortize the thread hand-off, small enough to balance.
  at::parallel_for(0, param.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    adamw_chunk(p + begin, g + begin, m + begin, v + begin, end - begin, s);
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
