"""nemo_aligner_draft.launch: the rendezvous derived from Slurm variables (reference: the values Slurm
documents for a 2-node × 4-task allocation, and scontrol's own host-list expansion when installed)."""
import shutil
import subprocess
import sys

import pytest

from nemo_aligner_draft import launch

ALLOC = {"SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NTASKS": "8", "SLURM_NODEID": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("nodelist,hosts", [("gpu[07-08]", ["gpu07", "gpu08"]), ("a,b", ["a", "b"]),
                                            ("n[1-2,9],x", ["n1", "n2", "n9", "x"]), ("solo", ["solo"])])
def test_hostlist_expansion(nodelist, hosts):
    assert launch._expand_simple(nodelist) == hosts
    if shutil.which("scontrol"):  # the same answer as Slurm's own parser
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10)
        except subprocess.TimeoutExpired:  # no slurm.conf: scontrol keeps retrying
            return
        if out.returncode == 0:
            assert out.stdout.split() == hosts


def test_task_env_one_process_per_gpu():
    env = launch.task_env(ALLOC)
    assert env == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123457 % 20000), "NNODES": "2",
                   "NODE_RANK": "1", "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launch.task_env({**ALLOC, "MASTER_PORT": "29999"})["MASTER_PORT"] == "29999"


def test_build_command_adds_topology_unless_given():
    cmd, extra = launch.build_command(["train.py", "--config-name=x", "a.b=1"], env=ALLOC)
    assert cmd == [sys.executable, "train.py", "--config-name=x", "a.b=1", "trainer.devices=4", "trainer.num_nodes=2"]
    assert extra["RANK"] == "5"
    cmd, _ = launch.build_command(["train.py", "trainer.devices=4"], env=ALLOC)
    assert cmd.count("trainer.devices=4") == 1 and cmd[-1] == "trainer.num_nodes=2"


def test_build_command_torchrun_per_node():
    env = {**ALLOC, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_GPUS_ON_NODE": "8"}
    cmd, extra = launch.build_command(["--torchrun", "train.py", "k=v"], env=env)
    assert extra == {}
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:9] == ["--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--master_addr=gpu07",
                        f"--master_port={20000 + 123457 % 20000}", "train.py"]
    assert cmd[9:] == ["k=v", "trainer.devices=8", "trainer.num_nodes=2"]


def test_uneven_tasks_and_missing_allocation_are_explained():
    with pytest.raises(RuntimeError, match="not a multiple"):
        launch.task_env({**ALLOC, "SLURM_NTASKS": "7"})
    with pytest.raises(RuntimeError, match="SLURM_NODEID is not set"):
        launch.task_env({k: v for k, v in ALLOC.items() if k != "SLURM_NODEID"})
