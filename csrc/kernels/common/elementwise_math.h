// Per-element formulas shared by the CPU kernels' scalar loops (csrc/kernels/cpu/fused_ops.cpp) and
// the CUDA kernels (csrc/kernels/cuda/fused_ops.cu): one definition each, so the CPU tests check
// the arithmetic the GPU runs. fp32 in, fp32 out; the callers load and store bf16.
#pragma once

#include <c10/macros/Macros.h>  // C10_HOST_DEVICE: __host__ __device__ under nvcc, nothing in C++
#include <math.h>

namespace megatron_ds {

// Rotate-half RoPE of one pair (x1 = x[i], x2 = x[half + i]) with c1 = cos[i], s1 = sin[i],
// c2 = cos[half + i], s2 = sin[half + i]. Backward applies the transposed rotation.
C10_HOST_DEVICE inline void rotary_pair(float x1, float x2, float c1, float s1, float c2, float s2, bool backward,
                                        float& y1, float& y2) {
  if (!backward) {
    y1 = x1 * c1 - x2 * s1;
    y2 = x2 * c2 + x1 * s2;
  } else {
    y1 = x1 * c1 + x2 * s2;
    y2 = x2 * c2 - x1 * s1;
  }
}

// silu(g) * u.
C10_HOST_DEVICE inline float swiglu_value(float g, float u) { return g / (1.f + expf(-g)) * u; }

// d/dg and d/du of silu(g) * u, times the output gradient d.
C10_HOST_DEVICE inline void swiglu_grad(float g, float u, float d, float& dg, float& du) {
  const float sig = 1.f / (1.f + expf(-g));
  dg = d * u * sig * (1.f + g * (1.f - sig));
  du = d * g * sig;
}

}  // namespace megatron_ds
