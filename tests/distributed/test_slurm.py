"""A real one-node Slurm cluster runs the project's sbatch script with 2 tasks on the tiny config.

The test installs Debian's slurm-wlm and munge when they are missing (CI runs as root), starts
munged on a private socket and slurmctld/slurmd on free ports from a private slurm.conf, submits
``examples/mm/stable_diffusion/slurm/draftp_sd.sub`` with ``sbatch --wait``, checks the run's outputs
and stops the three daemons it started, by pid.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from distributed_helpers import REPO, STEPS, VENV_BIN, child_env, load_dumps, max_abs_diff, tiny_overrides

SUB = os.path.join(REPO, "examples", "mm", "stable_diffusion", "slurm", "draftp_sd.sub")
TOOLS = ("sbatch", "scontrol", "slurmctld", "slurmd", "munged")


def _free_port(lo=20000, hi=40000):
    for _ in range(200):
        port = lo + int.from_bytes(os.urandom(2), "little") % (hi - lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def _ensure_slurm():
    if all(shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in TOOLS):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env,
                   capture_output=True, timeout=600)


def _wait_for(pred, what, timeout=60, logs=()):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.5)
    text = "".join(f"\n--- {p}\n" + (open(p).read()[-2000:] if os.path.exists(p) else "(none)") for p in logs)
    raise AssertionError(f"{what} not ready after {timeout} s{text}")


def _stop(procs):
    for p in reversed(procs):
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("a private Slurm cluster needs root here (slurmd runs jobs as their user); not root")
    _ensure_slurm()
    # short path: the munge socket path must fit in a unix socket address
    d = tempfile.mkdtemp(prefix="nadslurm", dir="/tmp")
    os.chmod(d, 0o755)
    for sub in ("state", "spool", "munge"):
        os.makedirs(os.path.join(d, sub), mode=0o755)
    key = os.path.join(d, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(d, "munge", "munge.sock")
    ctld_port, slurmd_port, master_port = _free_port(), _free_port(), _free_port()
    first_job = master_port - 20000 + 20000  # launch.py derives MASTER_PORT = 20000 + job_id % 20000
    conf = os.path.join(d, "slurm.conf")
    host = socket.gethostname()
    with open(conf, "w") as f:
        f.write(f"""ClusterName=nadtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
FirstJobId={first_job}
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=conf)
    procs = []
    try:
        munged = shutil.which("munged") or "/usr/sbin/munged"
        procs.append(subprocess.Popen([munged, "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                                       f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
                                       f"--seed-file={d}/munge/munged.seed"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: os.path.exists(sock), "munged", 20, [f"{d}/munge/munged.log"])
        slurmctld = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        procs.append(subprocess.Popen([slurmctld, "-D", "-i", "-f", conf], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([slurmd, "-D", "-N", host, "-f", conf], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def node_idle():
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mix")

        _wait_for(node_idle, "slurm node", 60, [f"{d}/slurmctld.log", f"{d}/slurmd.log"])
        yield {"dir": d, "env": env, "master_port": master_port, "procs": procs}
    finally:
        _stop(procs)
        assert all(p.poll() is not None for p in procs)
        shutil.rmtree(d, ignore_errors=True)


def test_sbatch_two_tasks_trains_in_data_parallel(cluster, tiny_sd_dir, tmp_path):
    run_dir, dump = str(tmp_path / "run"), str(tmp_path / "dump")
    env = dict(child_env(dump), SLURM_CONF=cluster["env"]["SLURM_CONF"], PYTHON=os.path.join(VENV_BIN, "python"),
               REPO=REPO, CONFIG_NAME="draftp_tiny")
    env.pop("MASTER_PORT", None)
    out_file = str(tmp_path / "job.out")
    # tiny_overrides starts with --config-name; the script passes its own --config-name from CONFIG_NAME
    overrides = tiny_overrides(tiny_sd_dir, run_dir)[1:]
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--gpus-per-node=0", "--time=10", f"--output={out_file}", SUB, *overrides]
    try:
        proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--full", "--partition=debug"], env=env, timeout=30)
        log = open(out_file).read() if os.path.exists(out_file) else "(no job output)"
        raise AssertionError(f"sbatch --wait did not finish in 240 s (job cancelled)\n{log[-4000:]}")
    log = open(out_file).read() if os.path.exists(out_file) else "(no job output)"
    assert proc.returncode == 0, f"sbatch rc={proc.returncode}\n{proc.stderr[-2000:]}\n{log[-4000:]}"
    job_id = int(proc.stdout.strip().split(";")[0])

    # the launcher derived the rendezvous from the allocation
    assert f"MASTER_ADDR={socket.gethostname()}" in log
    assert f"MASTER_PORT={20000 + job_id % 20000}" in log and job_id % 20000 + 20000 == cluster["master_port"]
    assert "trainer.devices=2" in log and "trainer.num_nodes=1" in log

    r0, r1 = load_dumps(dump)
    assert [(r["dp_rank"], r["dp_size"]) for r in (r0, r1)] == [(0, 2), (1, 2)]
    assert r0["global_step"] == STEPS == r1["global_step"]
    assert max_abs_diff(r0["params"], r1["params"]) == 0.0
    assert max_abs_diff(r0["params"], r0["initial_params"]) > 1e-3
    assert not set(r0["prompts"]) & set(r1["prompts"])
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "draftp_tiny.nemo"))
    assert os.path.isfile(os.path.join(run_dir, "export", "pytorch_lora_weights.safetensors"))
