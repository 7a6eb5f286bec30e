"""Start training inside a Slurm allocation: the rendezvous comes from the allocation, not from the user.

Two layouts, both used by ``examples/mm/stable_diffusion/slurm/``:

* one task per GPU (``srun --ntasks-per-node=G``)::

      srun python -m nemo_aligner_draft.launch examples/mm/stable_diffusion/train_sd_draftp.py [overrides]

  each task gets ``MASTER_ADDR`` (first host of ``scontrol show hostnames $SLURM_JOB_NODELIST``),
  ``MASTER_PORT`` (from the job id), ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``NODE_RANK`` from
  ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``/``SLURM_NODEID``, then execs the script.

* one torchrun per node (``srun --ntasks-per-node=1``)::

      srun python -m nemo_aligner_draft.launch --torchrun --nproc-per-node=G examples/.../train_sd_draftp.py

  execs ``torchrun --nnodes=N --node_rank=$SLURM_NODEID --nproc_per_node=G --master_addr=… --master_port=…``.

Both append ``trainer.devices`` (processes per node) and ``trainer.num_nodes`` unless the overrides
already set them, so the data-parallel size Lightning sees always equals the allocation's world.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Mapping, Optional

PORT_BASE, PORT_SPAN = 20000, 20000


def expand_hostlist(nodelist: str) -> List[str]:
    """Host names of a Slurm node list, via ``scontrol show hostnames`` (the authority on its syntax).

    Without a working ``scontrol`` (a container without Slurm's client tools or config) the common forms
    ``a,b``, ``node[1-3,7]`` and ``gpu[01-02]`` are expanded here; anything else is an error.
    """
    if shutil.which("scontrol"):
        try:  # without a slurm.conf scontrol retries for a minute: do not wait that long
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10)
            hosts = out.stdout.split()
            if out.returncode == 0 and hosts:
                return hosts
        except subprocess.TimeoutExpired:
            pass
    # no scontrol, or one that cannot read a slurm.conf (inside some containers)
    return _expand_simple(nodelist)


def _expand_simple(nodelist: str) -> List[str]:
    hosts: List[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"SLURM_JOB_NODELIST: cannot expand {nodelist!r} without scontrol")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST: empty node list {nodelist!r}")
    return hosts


def _need(env: Mapping[str, str], key: str) -> str:
    if key not in env:
        raise RuntimeError(f"{key} is not set: run this inside a Slurm allocation (sbatch/srun)")
    return env[key]


def master_port(env: Mapping[str, str]) -> int:
    """``MASTER_PORT`` if the user set one, else a port derived from the job id (the same on every node)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    return PORT_BASE + int(_need(env, "SLURM_JOB_ID")) % PORT_SPAN


def rendezvous(env: Mapping[str, str]) -> Dict[str, str]:
    """The allocation-wide part: master address/port, node count and this node's rank."""
    nodelist = env.get("SLURM_JOB_NODELIST") or _need(env, "SLURM_NODELIST")
    hosts = expand_hostlist(nodelist)
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    return {"MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0], "MASTER_PORT": str(master_port(env)),
            "NNODES": str(nnodes), "NODE_RANK": _need(env, "SLURM_NODEID")}


def task_env(env: Mapping[str, str]) -> Dict[str, str]:
    """torch.distributed variables for one srun task (one process per GPU)."""
    rdv = rendezvous(env)
    world = int(_need(env, "SLURM_NTASKS"))
    nnodes = int(rdv["NNODES"])
    if world % nnodes:
        raise RuntimeError(f"SLURM_NTASKS={world} is not a multiple of the {nnodes} nodes: use --ntasks-per-node")
    return {**rdv, "WORLD_SIZE": str(world), "RANK": _need(env, "SLURM_PROCID"),
            "LOCAL_RANK": _need(env, "SLURM_LOCALID"), "LOCAL_WORLD_SIZE": str(world // nnodes)}


def with_topology(args: List[str], devices: int, num_nodes: int) -> List[str]:
    """Append trainer.devices / trainer.num_nodes overrides unless already given."""
    out = list(args)
    keys = {a.split("=", 1)[0].lstrip("+") for a in args if "=" in a}
    if "trainer.devices" not in keys:
        out.append(f"trainer.devices={devices}")
    if "trainer.num_nodes" not in keys:
        out.append(f"trainer.num_nodes={num_nodes}")
    return out


def build_command(argv: Optional[List[str]] = None, env: Optional[Mapping[str, str]] = None):
    """Return ``(argv_to_exec, extra_env)`` for this task."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(description="Launch training from a Slurm allocation", allow_abbrev=False)
    p.add_argument("--torchrun", action="store_true", help="this task is one per node: exec torchrun")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="with --torchrun: processes per node (default: SLURM_GPUS_ON_NODE, else 1)")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    if a.torchrun:
        rdv = rendezvous(env)
        nproc = a.nproc_per_node or int(env.get("SLURM_GPUS_ON_NODE") or 1)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={rdv['NNODES']}",
               f"--node_rank={rdv['NODE_RANK']}", f"--nproc_per_node={nproc}",
               f"--master_addr={rdv['MASTER_ADDR']}", f"--master_port={rdv['MASTER_PORT']}", a.script,
               *with_topology(a.args, nproc, int(rdv["NNODES"]))]
        return cmd, {}
    extra = task_env(env)
    cmd = [sys.executable, a.script, *with_topology(a.args, int(extra["LOCAL_WORLD_SIZE"]), int(extra["NNODES"]))]
    return cmd, extra


def main(argv: Optional[List[str]] = None) -> None:
    cmd, extra = build_command(argv)
    env = dict(os.environ, **extra)
    if int(env.get("SLURM_PROCID", "0")) == 0:
        print(f"[launch] MASTER_ADDR={env.get('MASTER_ADDR')} MASTER_PORT={env.get('MASTER_PORT')} "
              f"exec: {' '.join(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
