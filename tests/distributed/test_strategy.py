"""Strategy selection (cli/train.py::build_strategy). FSDP training itself runs in test_fsdp.py."""
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy

from nemo_aligner_draft.cli.train import build_strategy


def _t(strategy="auto", devices=1, num_nodes=1):
    return SimpleNamespace(strategy=strategy, devices=devices, num_nodes=num_nodes)


@pytest.mark.parametrize("accelerator,backend", [("cpu", "gloo"), ("gpu", "nccl")])
def test_fsdp_is_the_sharding_strategy_over_every_process(accelerator, backend):
    from nemo_aligner_draft.models.fsdp import ShardedStrategy

    s = build_strategy(_t("fsdp", devices=8, num_nodes=2), accelerator)
    assert isinstance(s, ShardedStrategy)
    assert s.process_group_backend == backend
    # one data-parallel mesh dimension over all 16 processes, no tensor parallelism
    assert (s._data_parallel_size, s._tensor_parallel_size) == (16, 1)


@pytest.mark.parametrize("accelerator,backend", [("cpu", "gloo"), ("gpu", "nccl")])
def test_ddp_backend_follows_the_accelerator(accelerator, backend):
    s = build_strategy(_t("auto", devices=2), accelerator)
    assert isinstance(s, DDPStrategy) and s._process_group_backend == backend
    # num_nodes counts: 1 device on each of 2 nodes is still a 2-process world
    assert isinstance(build_strategy(_t("auto", devices=1, num_nodes=2), accelerator), DDPStrategy)


def test_single_process_keeps_auto():
    assert build_strategy(_t("auto"), "cpu") == "auto"


def test_nemo_model_fsdp_switch_is_the_same_strategy():
    from nemo_aligner_draft.models.fsdp import ShardedStrategy

    assert isinstance(build_strategy(_t("auto", devices=2), "cpu", fsdp=True), ShardedStrategy)
    assert not isinstance(build_strategy(_t("auto", devices=2), "cpu", fsdp=False), ShardedStrategy)
