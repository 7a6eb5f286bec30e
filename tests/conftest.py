"""Shared test setup: one CPU thread (timings and numerics stay stable on shared cores) and tiny
models built offline and saved in the real on-disk format."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> str:
    """A tiny random SD 1.x pipeline (ε-prediction, DDIM scheduler) saved as a diffusers directory."""
    from nemo_aligner_draft.testing.tiny import save_tiny_sd

    return save_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory) -> str:
    """The same tiny pipeline with a v-prediction scheduler config (SD 2.x style)."""
    from nemo_aligner_draft.testing.tiny import save_tiny_sd

    return save_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd_v")), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """A tiny random SDXL pipeline (ε-prediction, EulerDiscrete, force_zeros_for_empty_prompt)."""
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))
