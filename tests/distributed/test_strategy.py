"""Strategy selection (cli/train.py::build_strategy). Lightning's FSDP strategy refuses the CPU
accelerator ("The strategy `fsdp` requires a GPU accelerator"), so FSDP is checked here by
construction only; the CPU request gets a clear config error instead of Lightning's traceback."""
from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from nemo_aligner_draft.cli.train import build_strategy


def _t(strategy="auto", devices=1, num_nodes=1):
    return SimpleNamespace(strategy=strategy, devices=devices, num_nodes=num_nodes)


def test_fsdp_on_gpu_is_lightning_fsdp_with_nccl_and_orig_params():
    s = build_strategy(_t("fsdp", devices=8, num_nodes=2), "gpu")
    assert isinstance(s, FSDPStrategy)
    assert s._process_group_backend == "nccl"
    assert s.kwargs.get("use_orig_params") is True


def test_fsdp_on_cpu_is_refused_naming_the_key():
    from nemo_aligner_draft.errors import InputError

    with pytest.raises(InputError, match=r"^trainer\.strategy: fsdp needs GPUs") as e:
        build_strategy(_t("fsdp"), "cpu")
    assert e.value.key == "trainer.strategy"


@pytest.mark.parametrize("accelerator,backend", [("cpu", "gloo"), ("gpu", "nccl")])
def test_ddp_backend_follows_the_accelerator(accelerator, backend):
    s = build_strategy(_t("auto", devices=2), accelerator)
    assert isinstance(s, DDPStrategy) and s._process_group_backend == backend
    # num_nodes counts: 1 device on each of 2 nodes is still a 2-process world
    assert isinstance(build_strategy(_t("auto", devices=1, num_nodes=2), accelerator), DDPStrategy)


def test_single_process_keeps_auto():
    assert build_strategy(_t("auto"), "cpu") == "auto"
