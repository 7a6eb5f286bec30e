"""Fixtures: tiny reward models built offline and saved in the on-disk formats the real ones ship in."""
import pytest

from reward_helpers import save_tiny_hf_clip, save_tiny_open_clip


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> str:
    return save_tiny_hf_clip(str(tmp_path_factory.mktemp("tiny_hf_clip")))


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"))
