// Fused AdamW over a flat fp32 shard (CUDA): the CUDA implementation of megatron_ds::fused_adamw_,
// whose schema and CPU kernel live in csrc/kernels/cpu/adamw.cpp; the per-element update, the
// step's scalars and the checks are shared with it (csrc/kernels/common/adamw_common.h).
// One thread per 4 elements with float4 loads when the pointers allow, a grid-stride loop.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/adamw_common.h"

namespace {

using megatron_ds::AdamWScalars;
using megatron_ds::adamw_one;

__global__ void adamw_vec4_kernel(float4* __restrict__ p, const float4* __restrict__ g, float4* __restrict__ m,
                                  float4* __restrict__ v, int64_t n4, AdamWScalars s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
    float4 pp = p[i], gg = g[i], mm = m[i], vv = v[i];
    adamw_one(pp.x, gg.x, mm.x, vv.x, s);
    adamw_one(pp.y, gg.y, mm.y, vv.y, s);
    adamw_one(pp.z, gg.z, mm.z, vv.z, s);
    adamw_one(pp.w, gg.w, mm.w, vv.w, s);
    p[i] = pp;
    m[i] = mm;
    v[i] = vv;
  }
}

__global__ void adamw_scalar_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, int64_t n, AdamWScalars s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_one(pi, g[i], mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void fused_adamw_cuda(at::Tensor param, const at::Tensor& grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                      double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  megatron_ds::check_adamw_args(param, grad, exp_avg, exp_avg_sq);
  const AdamWScalars s = megatron_ds::adamw_scalars(lr, beta1, beta2, eps, weight_decay, step);
  const int64_t n = param.numel();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(param.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const int threads = 256;
  // Enough blocks to fill an H100/H200 several times over; the grid-stride loop covers the rest.
  const int max_blocks = 132 * 16;
  int64_t done = 0;
  if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
    const int64_t n4 = n / 4;
    if (n4 > 0) {
      int blocks = static_cast<int>(std::min<int64_t>((n4 + threads - 1) / threads, max_blocks));
      adamw_vec4_kernel<<<blocks, threads, 0, stream>>>(reinterpret_cast<float4*>(p),
                                                        reinterpret_cast<const float4*>(g),
                                                        reinterpret_cast<float4*>(m), reinterpret_cast<float4*>(v),
                                                        n4, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    done = n4 * 4;
  }
  if (done < n) {
    const int64_t rest = n - done;
    int blocks = static_cast<int>(std::min<int64_t>((rest + threads - 1) / threads, max_blocks));
    adamw_scalar_kernel<<<blocks, threads, 0, stream>>>(p + done, g + done, m + done, v + done, rest, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_ds, CUDA, m) {
  m.impl("fused_adamw_", &fused_adamw_cuda);
}
