// CUDA implementations (sm_80, sm_90) of the megatron_ds ops whose schemas and CPU kernels are in
// csrc/kernels/cpu/fused_ops.cpp: RMSNorm (+ residual add), rotary in place, SwiGLU, and the
// local passes of the vocab-parallel cross-entropy. fp32 and bf16 tensors, fp32 math.
//
// Only TORCH_LIBRARY_IMPL(megatron_ds, CUDA, m) here: the schemas belong to the CPU extension,
// which megatron_ds/kernels/fused.py loads first.
//
// Row kernels (norms, cross-entropy) use one block per row and a warp-shuffle block reduction;
// elementwise kernels (rotary, SwiGLU) a flat grid-stride loop whose per-element formulas are the
// CPU kernels' own (csrc/kernels/common/elementwise_math.h), so the CPU tests check them too.
// Only c10/ATen core headers are included (not ATen/cuda/CUDAContext.h), so the file compiles
// against a CPU-only torch too.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/elementwise_math.h"

namespace megatron_ds {
namespace {

using at::BFloat16;

constexpr int kRowThreads = 512;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(BFloat16 v) { return static_cast<float>(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block; every thread gets the result. `shared` holds >= 32 floats.
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < nwarps) ? shared[threadIdx.x] : 0.f;
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  return shared[0];
}

// Combine two (max, sum of exp(z - max)) pairs.
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) {
    m = m2;
    s = s2;
    return;
  }
  if (m2 > m) {
    s = s * __expf(m - m2) + s2;
    m = m2;
  } else {
    s += s2 * __expf(m2 - m);
  }
}

__device__ void block_max_sum(float& m, float& s, float* shm, float* shs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge_max_sum(m, s, m2, s2);
  }
  __syncthreads();
  if (lane == 0) {
    shm[warp] = m;
    shs[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    float mm = shm[0], ss = shs[0];
    for (int w = 1; w < nwarps; ++w) merge_max_sum(mm, ss, shm[w], shs[w]);
    shm[0] = mm;
    shs[0] = ss;
  }
  __syncthreads();
  m = shm[0];
  s = shs[0];
}

template <typename F>
void dispatch(at::ScalarType t, const char* name, F&& f) {
  if (t == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(t == at::kBFloat16, name, ": unsupported dtype ", t, " (float32 or bfloat16)");
    f(BFloat16{});
  }
}

int num_blocks(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

// ------------------------------------------------------------------------------------------
// RMSNorm

template <typename T>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res, const float* __restrict__ w,
                                    T* __restrict__ y, T* __restrict__ hsum, float* __restrict__ rstd, int64_t h,
                                    float eps) {
  __shared__ float shared[32];
  const int64_t r = blockIdx.x;
  const T* xr = x + r * h;
  float ss = 0.f;
  if (res != nullptr) {
    const T* rr = res + r * h;
    T* hr = hsum + r * h;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      T v = static_cast<T>(to_f(xr[i]) + to_f(rr[i]));  // round the sum as the unfused add would
      hr[i] = v;
      ss += to_f(v) * to_f(v);
    }
    xr = hr;  // this thread normalizes the elements it has just written: no sync needed
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) ss += to_f(xr[i]) * to_f(xr[i]);
  }
  const float rs = rsqrtf(block_sum(ss, shared) / static_cast<float>(h) + eps);
  if (threadIdx.x == 0) rstd[r] = rs;
  T* yr = y + r * h;
  for (int64_t i = threadIdx.x; i < h; i += blockDim.x) yr[i] = static_cast<T>(to_f(xr[i]) * rs * w[i]);
}

// One block walks rows blockIdx.x, blockIdx.x + gridDim.x, ...; thread t owns columns t, t + blockDim.x, ...
// and accumulates their dw in row blockIdx.x of dw_part (summed over blocks afterwards).
template <typename T>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ rstd, const T* __restrict__ dres, T* __restrict__ dx,
                                    float* __restrict__ dw_part, int64_t n, int64_t h) {
  __shared__ float shared[32];
  float* dwr = dw_part + static_cast<int64_t>(blockIdx.x) * h;
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
    const T* xr = x + r * h;
    const T* dyr = dy + r * h;
    const float rs = rstd[r];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float xh = to_f(xr[i]) * rs, d = to_f(dyr[i]);
      dot += d * w[i] * xh;
      dwr[i] += d * xh;
    }
    const float c = block_sum(dot, shared) / static_cast<float>(h);
    T* dxr = dx + r * h;
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float xh = to_f(xr[i]) * rs;
      float v = rs * (to_f(dyr[i]) * w[i] - xh * c);
      if (dres != nullptr) v += to_f(dres[r * h + i]);
      dxr[i] = static_cast<T>(v);
    }
  }
}

at::Tensor rows_shape(const at::Tensor& x) { return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_fwd_impl(const at::Tensor& x_in, const at::Tensor* res_in,
                                                             const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t h = x_in.size(-1);
  TORCH_CHECK(weight.numel() == h, "rms_norm: weight has ", weight.numel(), " elements, x's last dim is ", h);
  at::Tensor x = x_in.contiguous();
  at::Tensor res = res_in ? res_in->to(x.scalar_type()).contiguous() : at::Tensor();
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor hsum = res_in ? at::empty_like(x) : at::Tensor();
  at::Tensor rstd = rows_shape(x);
  const int64_t n = h ? x.numel() / h : 0;
  if (n == 0) return {y, hsum, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), "rms_norm_fwd", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_fwd_kernel<T><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
        x.data_ptr<T>(), res_in ? res.data_ptr<T>() : nullptr, w.data_ptr<float>(), y.data_ptr<T>(),
        res_in ? hsum.data_ptr<T>() : nullptr, rstd.data_ptr<float>(), h, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, hsum, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto out = norm_fwd_impl(x, nullptr, weight, eps);
  return {std::get<0>(out), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                                     const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual must have the same shape");
  return norm_fwd_impl(x, &residual, weight, eps);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                     const at::Tensor& weight, const at::Tensor& rstd_in,
                                                     const std::optional<at::Tensor>& dres_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t h = x_in.size(-1);
  at::Tensor x = x_in.contiguous();
  at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dres;
  if (dres_in.has_value() && dres_in->defined()) dres = dres_in->to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t n = h ? x.numel() / h : 0;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, 1024)));
  at::Tensor dw_part = at::zeros({blocks, h}, x.options().dtype(at::kFloat));
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), "rms_norm_bwd", [&](auto tag) {
      using T = decltype(tag);
      rms_norm_bwd_kernel<T><<<blocks, kRowThreads, 0, stream>>>(
          dy.data_ptr<T>(), x.data_ptr<T>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
          dres.defined() ? dres.data_ptr<T>() : nullptr, dx.data_ptr<T>(), dw_part.data_ptr<float>(), n, h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, dw_part.sum(0).to(weight.scalar_type()).view(weight.sizes())};
}

// ------------------------------------------------------------------------------------------
// Rotary, in place; same formulas as the CPU kernel. One thread per (s, b, head, i < d/2) pair.

template <typename T>
__global__ void rotary_kernel(T* __restrict__ t, int64_t s_len, int64_t b_len, int64_t nh, int64_t half,
                              int64_t st0, int64_t st1, int64_t st2, const float* __restrict__ cos,
                              const float* __restrict__ sin, int64_t c0, int64_t c1, int64_t s0, int64_t s1,
                              bool backward) {
  const int64_t total = s_len * b_len * nh * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    int64_t rest = idx / half;
    const int64_t hh = rest % nh;
    rest /= nh;
    const int64_t bi = rest % b_len, si = rest / b_len;
    T* x = t + si * st0 + bi * st1 + hh * st2;
    const float* c = cos + si * c0 + bi * c1;
    const float* sn = sin + si * s0 + bi * s1;
    float y1, y2;
    rotary_pair(to_f(x[i]), to_f(x[half + i]), c[i], sn[i], c[half + i], sn[half + i], backward, y1, y2);
    x[i] = static_cast<T>(y1);
    x[half + i] = static_cast<T>(y2);
  }
}

void rotary_one(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "rotary: q/k must be [s, b, heads, d] with a contiguous last dim");
  const int64_t d = t.size(3), half = d / 2;
  TORCH_CHECK(d % 2 == 0, "rotary: head dim ", d, " must be even");
  const int64_t total = t.size(0) * t.size(1) * t.size(2) * half;
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(t.scalar_type(), "rotary", [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<num_blocks(total, 256), 256, 0, stream>>>(
        t.data_ptr<T>(), t.size(0), t.size(1), t.size(2), half, t.stride(0), t.stride(1), t.stride(2),
        cos.data_ptr<float>(), sin.data_ptr<float>(), cos.stride(0), cos.size(1) == 1 ? 0 : cos.stride(1),
        sin.stride(0), sin.size(1) == 1 ? 0 : sin.stride(1), backward);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rotary_cuda(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor cos = cos_in.to(at::kFloat), sin = sin_in.to(at::kFloat);
  if (cos.stride(-1) != 1) cos = cos.contiguous();
  if (sin.stride(-1) != 1) sin = sin.contiguous();
  rotary_one(x, cos, sin, backward);
}

// ------------------------------------------------------------------------------------------
// SwiGLU

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ gu, T* __restrict__ out, int64_t n, int64_t f) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n * f;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / f, i = idx % f;
    out[idx] = static_cast<T>(swiglu_value(to_f(gu[r * 2 * f + i]), to_f(gu[r * 2 * f + f + i])));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ gu, T* __restrict__ dgu,
                                  int64_t n, int64_t f) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n * f;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / f, i = idx % f;
    float dg, du;
    swiglu_grad(to_f(gu[r * 2 * f + i]), to_f(gu[r * 2 * f + f + i]), to_f(dout[idx]), dg, du);
    dgu[r * 2 * f + i] = static_cast<T>(dg);
    dgu[r * 2 * f + f + i] = static_cast<T>(du);
  }
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gu_in) {
  const c10::cuda::CUDAGuard guard(gu_in.device());
  const int64_t f2 = gu_in.size(-1), f = f2 / 2;
  TORCH_CHECK(f2 % 2 == 0, "swiglu: last dim ", f2, " must be even ([gate | up])");
  at::Tensor gu = gu_in.contiguous();
  std::vector<int64_t> osize(gu.sizes().begin(), gu.sizes().end());
  osize.back() = f;
  at::Tensor out = at::empty(osize, gu.options());
  const int64_t n = f ? gu.numel() / f2 : 0;
  if (n * f == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(gu.scalar_type(), "swiglu_fwd", [&](auto tag) {
    using T = decltype(tag);
    swiglu_fwd_kernel<T><<<num_blocks(n * f, 256), 256, 0, stream>>>(gu.data_ptr<T>(), out.data_ptr<T>(), n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor swiglu_bwd_cuda(const at::Tensor& dout_in, const at::Tensor& gu_in) {
  const c10::cuda::CUDAGuard guard(gu_in.device());
  const int64_t f2 = gu_in.size(-1), f = f2 / 2;
  at::Tensor gu = gu_in.contiguous();
  at::Tensor dout = dout_in.to(gu.scalar_type()).contiguous();
  at::Tensor dgu = at::empty_like(gu);
  const int64_t n = f ? gu.numel() / f2 : 0;
  if (n * f == 0) return dgu;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(gu.scalar_type(), "swiglu_bwd", [&](auto tag) {
    using T = decltype(tag);
    swiglu_bwd_kernel<T><<<num_blocks(n * f, 256), 256, 0, stream>>>(dout.data_ptr<T>(), gu.data_ptr<T>(),
                                                                      dgu.data_ptr<T>(), n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dgu;
}

// ------------------------------------------------------------------------------------------
// Cross-entropy local passes. Forward: one sweep per row with an online (max, sum-exp) per thread,
// merged over the block. Backward: the gradient written over the logits.

template <typename T>
__global__ void ce_fwd_stats_kernel(const T* __restrict__ z, int64_t row_stride, const int64_t* __restrict__ target,
                                    int64_t n_valid, float* __restrict__ out_max, float* __restrict__ out_sum,
                                    float* __restrict__ out_target) {
  __shared__ float shm[32], shs[32];
  const int64_t r = blockIdx.x;
  const T* zr = z + r * row_stride;
  float m = -INFINITY, s = 0.f;
  for (int64_t i = threadIdx.x; i < n_valid; i += blockDim.x) {
    const float v = to_f(zr[i]);
    if (v > m) {
      s = (m == -INFINITY ? 0.f : s * __expf(m - v)) + 1.f;
      m = v;
    } else {
      s += __expf(v - m);
    }
  }
  block_max_sum(m, s, shm, shs);
  if (threadIdx.x == 0) {
    // No valid column on this rank: sum 0 at max 0, so the rescale exp(m - m_global) stays finite.
    out_max[r] = (n_valid == 0) ? 0.f : m;
    out_sum[r] = s;
    const int64_t t = target[r];
    out_target[r] = (t >= 0 && t < n_valid) ? to_f(zr[t]) : 0.f;
  }
}

template <typename T>
__global__ void ce_bwd_kernel(T* __restrict__ z, int64_t row_stride, int64_t v, const float* __restrict__ lse,
                              const int64_t* __restrict__ target, const float* __restrict__ grad, int64_t n_valid) {
  const int64_t r = blockIdx.x;
  T* zr = z + r * row_stride;
  const float l = lse[r], g = grad[r];
  const int64_t t = target[r];
  for (int64_t i = threadIdx.x; i < v; i += blockDim.x) {
    float out = 0.f;
    if (i < n_valid) out = (__expf(to_f(zr[i]) - l) - (i == t ? 1.f : 0.f)) * g;
    zr[i] = static_cast<T>(out);  // each element is read and written by the same thread
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_stats_cuda(const at::Tensor& logits, const at::Tensor& target_in,
                                                                 int64_t n_valid) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(logits.stride(-1) == 1, "cross_entropy: the logits' vocab dim must be contiguous");
  at::Tensor z = logits.view({-1, logits.size(-1)});
  at::Tensor target = target_in.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = z.size(0);
  TORCH_CHECK(target.numel() == n, "cross_entropy: ", target.numel(), " targets for ", n, " rows");
  TORCH_CHECK(n_valid >= 0 && n_valid <= z.size(1), "cross_entropy: n_valid out of range");
  auto fopt = logits.options().dtype(at::kFloat);
  at::Tensor mx = at::empty({n}, fopt), se = at::empty({n}, fopt), tl = at::empty({n}, fopt);
  if (n == 0) return {mx, se, tl};
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(z.scalar_type(), "ce_fwd_stats", [&](auto tag) {
    using T = decltype(tag);
    ce_fwd_stats_kernel<T><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
        z.data_ptr<T>(), z.stride(0), target.data_ptr<int64_t>(), n_valid, mx.data_ptr<float>(), se.data_ptr<float>(),
        tl.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mx, se, tl};
}

void ce_bwd_cuda(at::Tensor logits, const at::Tensor& lse_in, const at::Tensor& target_in, const at::Tensor& grad_in,
                 int64_t n_valid) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(logits.stride(-1) == 1, "cross_entropy: the logits' vocab dim must be contiguous");
  at::Tensor z = logits.view({-1, logits.size(-1)});
  at::Tensor target = target_in.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor lse = lse_in.reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor grad = grad_in.reshape({-1}).to(at::kFloat).contiguous();
  const int64_t n = z.size(0);
  TORCH_CHECK(target.numel() == n && lse.numel() == n && grad.numel() == n, "ce_bwd: per-row inputs must have ", n, " elements");
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(z.scalar_type(), "ce_bwd", [&](auto tag) {
    using T = decltype(tag);
    ce_bwd_kernel<T><<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(
        z.data_ptr<T>(), z.stride(0), z.size(1), lse.data_ptr<float>(), target.data_ptr<int64_t>(),
        grad.data_ptr<float>(), n_valid);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_ds, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
  m.impl("rotary_", &rotary_cuda);
  m.impl("swiglu_fwd", &swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
  m.impl("ce_fwd_stats", &ce_fwd_stats_cuda);
  m.impl("ce_bwd_", &ce_bwd_cuda);
}

}  // namespace megatron_ds
