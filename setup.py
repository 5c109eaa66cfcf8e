"""Installs the three packages of this repository: engine, models and datasets.

DeepSpeed imports torch while it builds, so install torch first and this project without build isolation:
    pip install torch torchvision && pip install --no-build-isolation -e .
"""

from setuptools import find_packages, setup

setup(
    name="videomae-ds",
    version="0.1.0",
    description="Masked video pre-training of vanilla ViTs (VideoMAE, MAE-ST, VIMPAC) on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Only our packages: tests/ and run_scripts/ stay in the checkout, and the generic names `datasets` and
    # `models` must never be shadowed by (or shadow) anything but this repository's folders.
    packages=find_packages(include=["engine", "engine.*", "models", "models.*", "datasets", "datasets.*"]),
    install_requires=[
        "torch>=2.6",  # safe_globals / weights_only loading of official checkpoints
        "torchvision",
        "deepspeed>=0.14",
        "timm>=1.0",
        "fairscale>=0.4.13",
        "decord>=0.6",
        "av>=12",
        "tensorboardX>=2.6",
        "pyyaml>=6",
        "omegaconf>=2.4",  # structured configs: typed loading, Literal fields, "did you mean" on unknown keys
        "numpy",
        "safetensors>=0.4",
        "vector-quantize-pytorch>=1.20",  # the video tokenizer's codebook: EMA updates, dead-code restarts, commitment
        "matplotlib>=3.7",  # the loss curve: axes, ticks and log scales a plotting library draws better
    ],
    # tensorboard: the viewer of the tb/ logs (`tensorboard --logdir runs`); dev: the test suite's extras
    # (transformers: checkpoint conversion; scikit-image: the reference HOG and its sample photographs)
    extras_require={"dev": ["pytest>=8", "transformers>=4.40", "scikit-image>=0.22"],
                    "tensorboard": ["tensorboard>=2.16"]},
)
