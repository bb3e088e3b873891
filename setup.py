# Packaging for olakernels (fused GPU ops) and olavlm (the OLA-VLM training engine).
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
DATA = ["transformers>=4.45", "tokenizers>=0.20", "pillow>=10.1"]
# olavlm.teachers: the teachers' model classes come from transformers; the target cache is
# safetensors shards (float8_e4m3 storage needs safetensors >= 0.4); huggingface-hub finds
# weights already in a local hub cache (never downloads). All three come with transformers.
TEACHERS = [*DATA, "safetensors>=0.4.3", "huggingface-hub>=0.23"]
# olavlm.models: the LLMs and the CLIP/SigLIP towers come from transformers; the ConvNeXt tower
# is open_clip's (its timm trunk).
MODEL = [*TEACHERS, "open_clip_torch>=3.0"]
# olavlm.train: run configs are YAML (JSON works without it); torchao for parallel.float8.
TRAIN = [*MODEL, "pyyaml>=6", "torchao>=0.10"]

setup(
    name="olavlm",
    version="0.1.0",
    description=(
        "Kernel-optimized training engine for OLA-VLM-style multimodal LLMs, "
        "and the fused ops behind it (olakernels)."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["olakernels", "olakernels.*", "olavlm", "olavlm.*"]),
    python_requires=">=3.10,<3.13",
    # olakernels stays light: torch + triton only. torch>=2.7 because FSDP2 (fully_shard) on
    # CPU/gloo and torch.library.custom_op/register_autograd/opcheck behave as we rely on from
    # there. Triton ships with the CUDA/ROCm torch wheels; on CPU it runs our kernels under
    # TRITON_INTERPRET=1 (the test suite does this). GPU users keep their own CUDA/ROCm torch.
    install_requires=[
        "torch>=2.7",
        "triton>=3.3; platform_system == 'Linux'",
        "numpy",  # the Triton interpreter needs it
    ],
    # olavlm.data: tokenizers (fast, offset-reporting), image decoding, the synthetic dataset's
    # tokenizer. olakernels never imports these.
    extras_require={
        "data": DATA,
        "teachers": TEACHERS,
        # liger-kernel: the parity test of linear_cross_entropy (it runs in the interpreter).
        # (liger-kernel imports packaging without declaring it.)
        "model": MODEL,
        # The training job: model + data + teachers + YAML configs + the loss plot.
        "train": [*TRAIN, "matplotlib>=3.7"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7", "liger-kernel", "packaging",
                 *TRAIN],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", *TRAIN],
        "dev": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7", "ruff", *TRAIN],
    },
    entry_points={"console_scripts": ["olavlm=olavlm.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
    ],
)
