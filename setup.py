"""nemo_pixellm: PixelLM vision-language models on Megatron-Core / Megatron-Bridge.

Exact versions live in requirements/lock-cpu.txt (installed by `make setup`); the ranges here are
what the code needs, for people who install the package into an environment of their own.
"""
from setuptools import find_packages, setup

setup(
    name="nemo_pixellm",
    version="0.1.0",
    description="PixelLM (DeepSeek-V3 MLA+MoE language model with a DeepSeek-VL2 vision system) for NeMo / Megatron",
    python_requires=">=3.12,<3.13",
    packages=find_packages(include=["nemo_pixellm", "nemo_pixellm.*"]),
    # conf/ stays at the repository root (Hydra's config dir); install editable (-e), as make and the Dockerfile do.
    install_requires=[
        "torch==2.14.1",
        "megatron-core==0.19.2",
        "megatron-bridge==0.6.2",
        "hydra-core==1.3.8",
        "omegaconf==2.3.1",
        "webdataset==1.0.2",
        "pillow==13.0.0",
        "tokenizers==0.22.2",
        "tensorboard==2.21.0",
    ],
    extras_require={
        # GPU-only kernels: present in the NGC base image (see Dockerfile); never required on CPU.
        "gpu": ["transformer-engine[pytorch]==2.9.0", "flash-attn==2.8.3"],
        "test": ["pytest==9.2.0", "transformers==5.12.1"],
    },
)
