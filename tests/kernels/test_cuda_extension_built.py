"""The CUDA extension is built and linked at install wherever it can be: torch with CUDA and nvcc.

No GPU is needed to load it: importing ``megatron_ds._C_kernels_cuda`` links it against torch's CUDA
libraries and registers its kernels, which the dispatcher then lists for the CUDA key. Every op the
CPU extension defines must have a CUDA kernel too, or a CUDA run would fail at that op. Where torch
has no CUDA, setup.py must not have built it (the references serve CUDA tensors there).
"""

import importlib
import importlib.util
import shutil

import torch

from megatron_ds.kernels import fused


def _ops_for(dispatch_key: str) -> set[str]:
    return {r for r in torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
            if r.startswith("megatron_ds::")}


def test_cuda_extension_is_built_exactly_where_torch_has_cuda_and_nvcc():
    assert fused.available(), fused.unavailable_reason()
    buildable = torch.version.cuda is not None and shutil.which("nvcc") is not None
    built = importlib.util.find_spec("megatron_ds._C_kernels_cuda") is not None
    assert built == buildable, (f"torch CUDA {torch.version.cuda}, nvcc {shutil.which('nvcc')}, "
                                f"_C_kernels_cuda {'present' if built else 'absent'}")
    if not buildable:
        return
    importlib.import_module("megatron_ds._C_kernels_cuda")  # links: libtorch_cuda, libcudart
    cpu_ops = _ops_for("CPU")
    assert len(cpu_ops) >= 9, cpu_ops  # norms (3), rotary, swiglu (2), cross-entropy (2), AdamW
    assert cpu_ops <= _ops_for("CUDA"), f"no CUDA kernel for {sorted(cpu_ops - _ops_for('CUDA'))}"
