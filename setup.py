"""Install megatron-ds: ``pip install -e .`` (add ``[test]`` for the test suite's references)."""

from setuptools import find_packages, setup

setup(
    name="megatron-ds",
    version="0.1.0",
    description="Megatron-style 3D-parallel trainer for DeepSeek LLM models, on PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ds", "megatron_ds.*"]),
    install_requires=[
        "torch>=2.5",  # SDPA with enable_gqa; a lower bound, not a pin to one build
        "numpy>=1.24",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tensorboard>=2.10",
    ],
    extras_require={
        # Reference implementations the tests compare against; never imported by the package.
        "test": ["pytest>=7", "transformers>=4.40"],
        # FP8/BF16 linear layers on CUDA machines (installs only where CUDA is present).
        "te": ["transformer_engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-ds-pretrain=megatron_ds.pretrain:cli"]},
)
