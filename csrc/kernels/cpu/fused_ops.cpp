// Fused CPU kernels of megatron_ds: RMSNorm (+ residual add), rotary embedding in place, SwiGLU,
// and the local passes of the vocab-parallel cross-entropy. fp32 and bf16 tensors; all math in fp32.
//
// This file also DEFINES the schemas of these ops (TORCH_LIBRARY_FRAGMENT(megatron_ds, m)): the
// CPU extension is always built, and the CUDA extension (csrc/kernels/cuda/) only adds CUDA
// implementations of the same names with TORCH_LIBRARY_IMPL. Other files add their own ops with
// their own TORCH_LIBRARY_FRAGMENT(megatron_ds, m); nobody uses a plain TORCH_LIBRARY.
//
// Autograd and the fake (meta) implementations are registered from Python in
// megatron_ds/kernels/_ops.py; the ops here are plain forward / backward kernels.
//
// The scalar loops (vector tails) use the per-element formulas of csrc/kernels/common/
// elementwise_math.h, which the CUDA kernels use too.
//
// Vectorization: at::vec::Vectorized<float> (AVX512 or AVX2 as setup.py's ISA flags choose),
// bf16 loaded and stored through fp32 vectors; rows split over threads with at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common/elementwise_math.h"

namespace megatron_ds {
namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();

inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline void store_f(float* p, const Vec& v) { v.store(p); }
// bf16 <-> fp32 for W bf16 values: ATen's register conversions with one full-width load or store.
// (at::vec::load_to_float / Vectorized<BFloat16>::store(p, W) move W of a 2W-lane bf16 vector
// through a stack buffer and memcpy; in the in-place cross-entropy backward that cost more than
// the exp.) The conversion rounds to nearest even and keeps NaN, as c10::BFloat16 does.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec load_f(const BFloat16* p) {
  __m512 out;
  at::vec::cvtbf16_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), out);
  return Vec(out);
}
inline void store_f(BFloat16* p, const Vec& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec load_f(const BFloat16* p) {
  __m256 out;
  at::vec::cvtbf16_fp32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), out);
  return Vec(out);
}
inline void store_f(BFloat16* p, const Vec& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
}
#else
inline Vec load_f(const BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline void store_f(BFloat16* p, const Vec& v) { at::vec::convert_from_float<BFloat16>(v, v).store(p, W); }
#endif
inline float to_f(float v) { return v; }
inline float to_f(BFloat16 v) { return static_cast<float>(v); }

// Rows per parallel_for chunk: about 32k elements of work each.
inline int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len)); }

// exp for the elementwise hot loops (SwiGLU, cross-entropy): ATen's inlined polynomial exp_u20, the
// one its own CPU softmax and flash-attention kernels use. Vec::exp() is an out-of-line call to
// Sleef_expf8_u10 that costs about 3x as much per vector, and these kernels do little else per
// element, so it set their speed. Relative error about 1e-6 (measured; u20 = 20 ulp bound),
// below the 1e-5 the fp32 tests allow and far below bf16's 2^-8. Inputs below ln(FLT_MIN) give 0,
// above ln(FLT_MAX) a huge finite value (so 1 / (1 + exp(-g)) still goes to 0, not NaN). exp_u20
// clamps NaN to a finite value; the blend gives NaN back, so a NaN input still poisons the result.
inline Vec fast_exp(const Vec& v) { return Vec::blendv(v.exp_u20(), v, v != v); }

void check_float_or_bf16(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "megatron_ds: ", what, " must be float32 or bfloat16, got ", t.scalar_type());
}

#define MDS_DISPATCH(dtype, NAME, ...)                                   \
  [&] {                                                                  \
    if ((dtype) == at::kFloat) {                                         \
      using scalar_t = float;                                            \
      return __VA_ARGS__();                                              \
    }                                                                    \
    TORCH_CHECK((dtype) == at::kBFloat16, NAME, ": unsupported dtype ", (dtype)); \
    using scalar_t = BFloat16;                                           \
    return __VA_ARGS__();                                                \
  }()

// ------------------------------------------------------------------------------------------
// RMSNorm: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), over the last dim.

template <typename T>
float row_sum_sq(const T* x, int64_t h) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + W <= h; i += W) {
    Vec v = load_f(x + i);
    acc = at::vec::fmadd(v, v, acc);
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; i < h; ++i) s += to_f(x[i]) * to_f(x[i]);
  return s;
}

template <typename T>
void rms_norm_rows(const T* x, const float* w, T* y, float* rstd, int64_t n, int64_t h, double eps) {
  at::parallel_for(0, n, grain_rows(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      T* yr = y + r * h;
      float rs = 1.f / std::sqrt(row_sum_sq(xr, h) / static_cast<float>(h) + static_cast<float>(eps));
      rstd[r] = rs;
      Vec vrs(rs);
      int64_t i = 0;
      for (; i + W <= h; i += W) store_f(yr + i, load_f(xr + i) * vrs * Vec::loadu(w + i));
      for (; i < h; ++i) yr[i] = static_cast<T>(to_f(xr[i]) * rs * w[i]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_float_or_bf16(x_in, "rms_norm x");
  const int64_t h = x_in.size(-1);
  TORCH_CHECK(weight.numel() == h, "rms_norm: weight has ", weight.numel(), " elements, x's last dim is ", h);
  at::Tensor x = x_in.contiguous();
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = h ? x.numel() / h : 0;
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  MDS_DISPATCH(x.scalar_type(), "rms_norm_fwd", [&] {
    rms_norm_rows(x.data_ptr<scalar_t>(), w.data_ptr<float>(), y.data_ptr<scalar_t>(), rstd.data_ptr<float>(), n, h, eps);
  });
  return {y, rstd};
}

// h = x + residual (rounded to x's dtype, as the unfused add would), then y = rms_norm(h).
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd_cpu(const at::Tensor& x_in, const at::Tensor& res_in,
                                                                    const at::Tensor& weight, double eps) {
  check_float_or_bf16(x_in, "add_rms_norm x");
  TORCH_CHECK(x_in.sizes() == res_in.sizes() && x_in.scalar_type() == res_in.scalar_type(),
              "add_rms_norm: x and residual must have the same shape and dtype");
  const int64_t hd = x_in.size(-1);
  TORCH_CHECK(weight.numel() == hd, "add_rms_norm: weight has ", weight.numel(), " elements, x's last dim is ", hd);
  at::Tensor x = x_in.contiguous(), res = res_in.contiguous();
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x), hsum = at::empty_like(x);
  const int64_t n = hd ? x.numel() / hd : 0;
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  MDS_DISPATCH(x.scalar_type(), "add_rms_norm_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = res.data_ptr<scalar_t>();
    scalar_t* hp = hsum.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    float* sp = rstd.data_ptr<float>();
    at::parallel_for(0, n, grain_rows(hd), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * hd;
        const scalar_t* rr = rp + r * hd;
        scalar_t* hr = hp + r * hd;
        // Pass 1 writes h (the stored, rounded sum) and accumulates its squares from the rounded values.
        Vec acc(0.f);
        int64_t i = 0;
        for (; i + W <= hd; i += W) {
          store_f(hr + i, load_f(xr + i) + load_f(rr + i));
          Vec v = load_f(hr + i);
          acc = at::vec::fmadd(v, v, acc);
        }
        float ss = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
        for (; i < hd; ++i) {
          hr[i] = static_cast<scalar_t>(to_f(xr[i]) + to_f(rr[i]));
          float v = to_f(hr[i]);
          ss += v * v;
        }
        float rs = 1.f / std::sqrt(ss / static_cast<float>(hd) + static_cast<float>(eps));
        sp[r] = rs;
        Vec vrs(rs);
        scalar_t* yr = yp + r * hd;
        for (i = 0; i + W <= hd; i += W) store_f(yr + i, load_f(hr + i) * vrs * Vec::loadu(wp + i));
        for (; i < hd; ++i) yr[i] = static_cast<scalar_t>(to_f(hr[i]) * rs * wp[i]);
      }
    });
  });
  return {y, hsum, rstd};
}

// dx = rstd * (g - xhat * mean(g * xhat)) [+ dres], g = dy * w, xhat = x * rstd; dw = sum_rows dy * xhat.
// dw is accumulated in one fp32 row per thread, then summed: no atomics, deterministic for a
// fixed thread count.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                    const at::Tensor& weight, const at::Tensor& rstd_in,
                                                    const std::optional<at::Tensor>& dres_in) {
  check_float_or_bf16(x_in, "rms_norm_bwd x");
  const int64_t h = x_in.size(-1);
  at::Tensor x = x_in.contiguous();
  at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor rstd = rstd_in.contiguous();
  at::Tensor dres;
  if (dres_in.has_value() && dres_in->defined()) dres = dres_in->to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty_like(x);
  const int64_t n = h ? x.numel() / h : 0;
  const int64_t nthreads = at::get_num_threads();
  at::Tensor dw_part = at::zeros({nthreads, h}, x.options().dtype(at::kFloat));
  MDS_DISPATCH(x.scalar_type(), "rms_norm_bwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    const scalar_t* drp = dres.defined() ? dres.data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const float* wp = w.data_ptr<float>();
    const float* sp = rstd.data_ptr<float>();
    float* dwp = dw_part.data_ptr<float>();
    at::parallel_for(0, n, grain_rows(h), [&](int64_t begin, int64_t end) {
      float* dwr = dwp + at::get_thread_num() * h;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * h;
        const scalar_t* dyr = dyp + r * h;
        const float rs = sp[r];
        const Vec vrs(rs);
        // Pass 1: dot = sum(g * xhat); dw += dy * xhat.
        Vec acc(0.f);
        int64_t i = 0;
        for (; i + W <= h; i += W) {
          Vec xh = load_f(xr + i) * vrs;
          Vec d = load_f(dyr + i);
          acc = at::vec::fmadd(d * Vec::loadu(wp + i), xh, acc);
          at::vec::fmadd(d, xh, Vec::loadu(dwr + i)).store(dwr + i);
        }
        float dot = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
        for (; i < h; ++i) {
          float xh = to_f(xr[i]) * rs, d = to_f(dyr[i]);
          dot += d * wp[i] * xh;
          dwr[i] += d * xh;
        }
        const float c = dot / static_cast<float>(h);
        const Vec vc(c);
        // Pass 2: dx.
        scalar_t* dxr = dxp + r * h;
        const scalar_t* drr = drp ? drp + r * h : nullptr;
        for (i = 0; i + W <= h; i += W) {
          Vec xh = load_f(xr + i) * vrs;
          Vec g = load_f(dyr + i) * Vec::loadu(wp + i);
          Vec v = vrs * (g - xh * vc);
          if (drr) v = v + load_f(drr + i);
          store_f(dxr + i, v);
        }
        for (; i < h; ++i) {
          float xh = to_f(xr[i]) * rs;
          float v = rs * (to_f(dyr[i]) * wp[i] - xh * c);
          if (drr) v += to_f(drr[i]);
          dxr[i] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  at::Tensor dw = dw_part.sum(0).to(weight.scalar_type()).view(weight.sizes());
  return {dx, dw};
}

// ------------------------------------------------------------------------------------------
// Rotary embedding, rotate-half layout, in place on x = q [s, b, nq, d] or k [s, b, nk, d] (any
// strides with a contiguous last dim: views into the fused QKV output work), cos/sin [s, b, 1, d]
// (any strides over s and b: an expanded table or per-sequence position ids).
// Forward:  x1' = x1 c1 - x2 s1,   x2' = x2 c2 + x1 s2   (x1 = x[:d/2], c1 = cos[:d/2], c2 = cos[d/2:] ...)
// Backward (the transpose, applied to the gradient): g1' = g1 c1 + g2 s2,  g2' = g2 c2 - g1 s1.

template <typename T>
void rotate_heads(T* base, int64_t s_len, int64_t b_len, int64_t nh, int64_t d, const int64_t* st,
                  const float* cosp, const float* sinp, const int64_t* cst, const int64_t* sst, bool backward) {
  const int64_t half = d / 2;
  at::parallel_for(0, s_len * b_len, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, nh * d)), [&](int64_t begin, int64_t end) {
    for (int64_t sb = begin; sb < end; ++sb) {
      const int64_t si = sb / b_len, bi = sb % b_len;
      const float* c = cosp + si * cst[0] + bi * cst[1];
      const float* sn = sinp + si * sst[0] + bi * sst[1];
      for (int64_t hh = 0; hh < nh; ++hh) {
        T* x = base + si * st[0] + bi * st[1] + hh * st[2];
        int64_t i = 0;
        for (; i + W <= half; i += W) {
          Vec x1 = load_f(x + i), x2 = load_f(x + half + i);
          Vec c1 = Vec::loadu(c + i), c2 = Vec::loadu(c + half + i);
          Vec s1 = Vec::loadu(sn + i), s2 = Vec::loadu(sn + half + i);
          if (!backward) {
            store_f(x + i, x1 * c1 - x2 * s1);
            store_f(x + half + i, x2 * c2 + x1 * s2);
          } else {
            store_f(x + i, x1 * c1 + x2 * s2);
            store_f(x + half + i, x2 * c2 - x1 * s1);
          }
        }
        for (; i < half; ++i) {
          float y1, y2;
          rotary_pair(to_f(x[i]), to_f(x[half + i]), c[i], sn[i], c[half + i], sn[half + i], backward, y1, y2);
          x[i] = static_cast<T>(y1);
          x[half + i] = static_cast<T>(y2);
        }
      }
    }
  });
}

void rotary_one(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  check_float_or_bf16(t, "rotary q/k");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "rotary: q/k must be [s, b, heads, d] with a contiguous last dim");
  const int64_t d = t.size(3);
  TORCH_CHECK(d % 2 == 0, "rotary: head dim ", d, " must be even");
  TORCH_CHECK(cos.size(0) == t.size(0) && cos.size(-1) == d, "rotary: cos/sin must be [s, b or 1, 1, d]");
  const int64_t cst[2] = {cos.stride(0), cos.size(1) == 1 ? 0 : cos.stride(1)};
  const int64_t sst[2] = {sin.stride(0), sin.size(1) == 1 ? 0 : sin.stride(1)};
  const int64_t st[3] = {t.stride(0), t.stride(1), t.stride(2)};
  MDS_DISPATCH(t.scalar_type(), "rotary", [&] {
    rotate_heads(t.data_ptr<scalar_t>(), t.size(0), t.size(1), t.size(2), d, st, cos.data_ptr<float>(),
                 sin.data_ptr<float>(), cst, sst, backward);
  });
}

at::Tensor float_table(const at::Tensor& t) {
  at::Tensor f = t.to(at::kFloat);
  if (f.stride(-1) != 1) f = f.contiguous();
  return f;
}

void rotary_cpu(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool backward) {
  rotary_one(x, float_table(cos_in), float_table(sin_in), backward);
}

// ------------------------------------------------------------------------------------------
// SwiGLU from the concatenated projection gate_up [..., 2f] = [gate | up]:
//   out = silu(g) * u,   dg = dout * u * sig(g) * (1 + g (1 - sig(g))),   du = dout * silu(g).

at::Tensor swiglu_fwd_cpu(const at::Tensor& gu_in) {
  check_float_or_bf16(gu_in, "swiglu input");
  const int64_t f2 = gu_in.size(-1);
  TORCH_CHECK(f2 % 2 == 0, "swiglu: last dim ", f2, " must be even ([gate | up])");
  const int64_t f = f2 / 2;
  at::Tensor gu = gu_in.contiguous();
  std::vector<int64_t> osize(gu.sizes().begin(), gu.sizes().end());
  osize.back() = f;
  at::Tensor out = at::empty(osize, gu.options());
  const int64_t n = f ? gu.numel() / f2 : 0;
  MDS_DISPATCH(gu.scalar_type(), "swiglu_fwd", [&] {
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const Vec one(1.f);
    at::parallel_for(0, n, grain_rows(f), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = gp + r * f2;
        const scalar_t* u = g + f;
        scalar_t* o = op + r * f;
        int64_t i = 0;
        for (; i + W <= f; i += W) {
          Vec gv = load_f(g + i);
          store_f(o + i, gv / (one + fast_exp(gv.neg())) * load_f(u + i));
        }
        for (; i < f; ++i) o[i] = static_cast<scalar_t>(swiglu_value(to_f(g[i]), to_f(u[i])));
      }
    });
  });
  return out;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& dout_in, const at::Tensor& gu_in) {
  check_float_or_bf16(gu_in, "swiglu input");
  const int64_t f2 = gu_in.size(-1), f = f2 / 2;
  at::Tensor gu = gu_in.contiguous();
  at::Tensor dout = dout_in.to(gu.scalar_type()).contiguous();
  TORCH_CHECK(dout.numel() * 2 == gu.numel(), "swiglu_bwd: grad has ", dout.numel(), " elements, expected ", gu.numel() / 2);
  at::Tensor dgu = at::empty_like(gu);
  const int64_t n = f ? gu.numel() / f2 : 0;
  MDS_DISPATCH(gu.scalar_type(), "swiglu_bwd", [&] {
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    const scalar_t* dop = dout.data_ptr<scalar_t>();
    scalar_t* dp = dgu.data_ptr<scalar_t>();
    const Vec one(1.f);
    at::parallel_for(0, n, grain_rows(f), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = gp + r * f2;
        const scalar_t* u = g + f;
        const scalar_t* dor = dop + r * f;
        scalar_t* dg = dp + r * f2;
        scalar_t* du = dg + f;
        int64_t i = 0;
        for (; i + W <= f; i += W) {
          Vec gv = load_f(g + i), uv = load_f(u + i), dv = load_f(dor + i);
          Vec sig = one / (one + fast_exp(gv.neg()));
          Vec silu = gv * sig;
          store_f(dg + i, dv * uv * sig * (one + gv * (one - sig)));
          store_f(du + i, dv * silu);
        }
        for (; i < f; ++i) {
          float dgv, duv;
          swiglu_grad(to_f(g[i]), to_f(u[i]), to_f(dor[i]), dgv, duv);
          dg[i] = static_cast<scalar_t>(dgv);
          du[i] = static_cast<scalar_t>(duv);
        }
      }
    });
  });
  return dgu;
}

// ------------------------------------------------------------------------------------------
// Vocab-parallel cross-entropy, local passes over this rank's logits [N, V/tp] (rows may be
// strided, the vocab dim contiguous). Columns >= n_valid are padding: excluded, zero gradient.
// target_local [N] int64: the target's column on this rank, or -1 when another rank owns it.
//
// ce_fwd_stats: per row, the local max m, sum_j exp(z_j - m) and the target logit z_t (0 if
//   not owned). One sweep over the row, max and sum-exp online per L1-sized chunk: one read of
//   the logits from memory.
// (Python: all-reduce MAX of m; rescale the sums to the global max; all-reduce SUM of sums and
//  target logits; lse = m + log(sum).)
// ce_bwd_: over the logits in place, z_j <- (exp(z_j - lse) - [j == t]) * grad_loss, in the
//   logits' dtype: the gradient needs no buffer of its own.

// Logits per online-softmax chunk in ce_fwd_stats: 16 KB of fp32, well inside L1.
constexpr int64_t kCeChunk = 4096;

at::Tensor rows_view(const at::Tensor& logits) {
  TORCH_CHECK(logits.stride(-1) == 1, "cross_entropy: the logits' vocab dim must be contiguous");
  return logits.view({-1, logits.size(-1)});  // fails loudly if the rows cannot be flattened
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_fwd_stats_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                                int64_t n_valid) {
  check_float_or_bf16(logits_in, "cross_entropy logits");
  at::Tensor z = rows_view(logits_in);
  at::Tensor target = target_in.reshape({-1}).to(at::kLong).contiguous();
  const int64_t n = z.size(0), v = z.size(1);
  TORCH_CHECK(target.numel() == n, "cross_entropy: ", target.numel(), " targets for ", n, " rows");
  TORCH_CHECK(n_valid >= 0 && n_valid <= v, "cross_entropy: n_valid ", n_valid, " outside [0, ", v, "]");
  auto fopt = logits_in.options().dtype(at::kFloat);
  at::Tensor mx = at::empty({n}, fopt), se = at::empty({n}, fopt), tl = at::empty({n}, fopt);
  const int64_t rs = z.stride(0);
  MDS_DISPATCH(z.scalar_type(), "ce_fwd_stats", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t* tp = target.data_ptr<int64_t>();
    float *mp = mx.data_ptr<float>(), *sp = se.data_ptr<float>(), *tlp = tl.data_ptr<float>();
    const float ninf = -std::numeric_limits<float>::infinity();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* zr = zp + r * rs;
        // Online max and sum-exp over chunks small enough to stay in L1: the chunk's max first,
        // then, if it raised the running max m, the sum so far is moved to the new max
        // (s *= exp(m_old - m_new), one scalar exp per chunk), then the chunk's exps are summed
        // from L1. One read of the row from memory, one exp per logit.
        float m = ninf, s = 0.f;
        for (int64_t c0 = 0; c0 < n_valid; c0 += kCeChunk) {
          const int64_t c1 = std::min(n_valid, c0 + kCeChunk);
          Vec vm0(ninf), vm1(ninf);  // two chains: maximum's latency, not its throughput, would bound one
          int64_t i = c0;
          for (; i + 2 * W <= c1; i += 2 * W) {
            vm0 = at::vec::maximum(vm0, load_f(zr + i));
            vm1 = at::vec::maximum(vm1, load_f(zr + i + W));
          }
          for (; i + W <= c1; i += W) vm0 = at::vec::maximum(vm0, load_f(zr + i));
          float cm = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                                    at::vec::maximum(vm0, vm1));
          for (; i < c1; ++i) cm = std::max(cm, to_f(zr[i]));
          if (!(cm <= m)) {  // a higher max, or NaN: then s becomes NaN and stays NaN, as in eager
            s *= std::exp(m - cm);  // m = -inf on the first chunk: s = 0 * 0
            m = cm;
          }
          if (m == ninf) continue;  // every logit so far is -inf: they add exp(-inf) = 0
          const Vec vmx(m);
          Vec acc0(0.f), acc1(0.f);
          for (i = c0; i + 2 * W <= c1; i += 2 * W) {
            acc0 = acc0 + fast_exp(load_f(zr + i) - vmx);
            acc1 = acc1 + fast_exp(load_f(zr + i + W) - vmx);
          }
          for (; i + W <= c1; i += W) acc0 = acc0 + fast_exp(load_f(zr + i) - vmx);
          float cs = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
          for (; i < c1; ++i) cs += std::exp(to_f(zr[i]) - m);
          s += cs;
        }
        // A row with no valid column (n_valid == 0 on this rank) contributes sum 0 at max -inf;
        // use 0 as its max so the rescale exp(m - m_global) in Python stays finite.
        if (n_valid == 0) m = 0.f;
        mp[r] = m;
        sp[r] = s;
        const int64_t t = tp[r];
        tlp[r] = (t >= 0 && t < n_valid) ? to_f(zr[t]) : 0.f;
      }
    });
  });
  return {mx, se, tl};
}

void ce_bwd_cpu(at::Tensor logits, const at::Tensor& lse_in, const at::Tensor& target_in, const at::Tensor& grad_in,
                int64_t n_valid) {
  check_float_or_bf16(logits, "cross_entropy logits");
  at::Tensor z = rows_view(logits);
  at::Tensor target = target_in.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor lse = lse_in.reshape({-1}).to(at::kFloat).contiguous();
  at::Tensor grad = grad_in.reshape({-1}).to(at::kFloat).contiguous();
  const int64_t n = z.size(0), v = z.size(1), rs = z.stride(0);
  TORCH_CHECK(target.numel() == n && lse.numel() == n && grad.numel() == n, "ce_bwd: per-row inputs must have ", n, " elements");
  MDS_DISPATCH(z.scalar_type(), "ce_bwd", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t* tp = target.data_ptr<int64_t>();
    const float *lp = lse.data_ptr<float>(), *gp = grad.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* zr = zp + r * rs;
        const float l = lp[r], g = gp[r];
        const Vec vl(l), vg(g);
        const int64_t t = tp[r];
        // Read the target logit's softmax before the row is overwritten.
        float p_t = (t >= 0 && t < n_valid) ? std::exp(to_f(zr[t]) - l) : 0.f;
        int64_t i = 0;
        for (; i + W <= n_valid; i += W) store_f(zr + i, fast_exp(load_f(zr + i) - vl) * vg);
        for (; i < n_valid; ++i) zr[i] = static_cast<scalar_t>(std::exp(to_f(zr[i]) - l) * g);
        for (; i < v; ++i) zr[i] = static_cast<scalar_t>(0.f);
        if (t >= 0 && t < n_valid) zr[t] = static_cast<scalar_t>((p_t - 1.f) * g);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron_ds, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd, Tensor? dresidual) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, bool backward) -> ()");
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor");
  m.def("swiglu_bwd(Tensor grad_out, Tensor gate_up) -> Tensor");
  m.def("ce_fwd_stats(Tensor logits, Tensor target_local, int n_valid) -> (Tensor, Tensor, Tensor)");
  m.def("ce_bwd_(Tensor(a!) logits, Tensor lse, Tensor target_local, Tensor grad_loss, int n_valid) -> ()");
}

TORCH_LIBRARY_IMPL(megatron_ds, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("rotary_", &rotary_cpu);
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
  m.impl("ce_fwd_stats", &ce_fwd_stats_cpu);
  m.impl("ce_bwd_", &ce_bwd_cpu);
}

}  // namespace megatron_ds
