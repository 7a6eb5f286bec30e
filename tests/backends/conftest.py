"""Fixtures for backend tests: a tiny random SDXL pipeline saved in diffusers' on-disk layout."""
import pytest


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    """A tiny random SDXL pipeline (ε-prediction, EulerDiscrete, force_zeros_for_empty_prompt)."""
    from nemo_aligner_draft.testing.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))
