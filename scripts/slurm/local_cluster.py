"""A real one-node SLURM on this machine, for trying and testing the SLURM path (scripts/slurm/train.sbatch):
``munged``, ``slurmctld`` and ``slurmd`` started as child processes of this script, with their own munge key,
``slurm.conf`` (this machine's cores, free ports) and state in one folder, and stopped when it ends.

    sudo python scripts/slurm/local_cluster.py --install -- \\
        sbatch --wait --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --output=runs/slurm/%x-%j.out \\
        scripts/slurm/train.sbatch recipes/fox_lm.yaml --trainer.accelerator=cpu --trainer.strategy=ddp \\
        --trainer.max_steps=30

runs the command with ``SLURM_CONF`` pointing at the cluster (``sbatch``, ``squeue``, ``scontrol`` ... then talk to
it) and exits with its exit code.  ``--install`` installs Debian/Ubuntu's ``slurm-wlm`` and ``munge`` with apt-get
when they are missing.  Needs root (slurmd starts jobs as their users).  ``--no-requeue-delay`` lets SLURM start a
requeued job after 11 s instead of its default two minutes (the hold is the job credential's lifetime,
``AuthInfo=cred_expire``; the test suite shortens it to keep preemption tests short).
``LocalSlurm`` is the same thing as a context manager for tests (tests/test_slurm.py).
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
PACKAGES = ("slurm-wlm", "munge")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (tests skip with it)."""


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def ensure_installed(install: bool = True) -> None:
    """Raise ``SlurmUnavailable`` unless the SLURM and munge programs are here (installing them with apt-get first
    when ``install`` and possible) and this process is root."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("a local SLURM needs root (slurmd starts jobs as their users); run as root")
    missing = missing_binaries()
    if missing and install and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                                                   *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SlurmUnavailable(f"{' '.join(cmd)} failed: {tail[0]}")
        missing = missing_binaries()
    if missing:
        raise SlurmUnavailable(f"{', '.join(missing)} not found: install the {' and '.join(PACKAGES)} packages "
                               "(Debian/Ubuntu: apt-get install slurm-wlm munge)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """One-node SLURM owned by this object: ``with LocalSlurm(folder) as slurm: slurm.sbatch([...])``."""

    def __init__(self, folder: Optional[str] = None, cpus: Optional[int] = None, requeue_delay: bool = True):
        self.dir = Path(folder or tempfile.mkdtemp(prefix="local-slurm-")).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.requeue_delay = requeue_delay
        self.procs: List[subprocess.Popen] = []

    # ------------------------------------------------------------------ start / stop
    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 90.0) -> None:
        ensure_installed(install=False)
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o711)  # clients reach the socket; the key stays private
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        os.chmod(key, 0o600)
        socket_path = self.dir / "munge" / "munge.socket"
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={socket_path}", f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.dir / 'munge' / 'seed'}",
                               f"--log-file={self.dir / 'log' / 'munged.log'}"])
        self._wait(lambda: socket_path.exists(), 20, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "the node did not become idle")

    def _slurm_conf(self, munge_socket: Path) -> str:
        """``cred_expire`` (default 120 s) is also how long SLURM holds a requeued job before it may start again."""
        d = self.dir
        auth = f"socket={munge_socket}" + ("" if self.requeue_delay else ",cred_expire=10")
        return "\n".join([
            "ClusterName=recipes", f"SlurmctldHost={self.node}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo={auth}",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={d / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "MpiDefault=none", "JobRequeue=1", "MinJobAge=3600",
            f"NodeName={self.node} CPUs={self.cpus} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])

    def _spawn(self, name: str, cmd: List[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))
        out.close()

    def _node_ready(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{Path(proc.args[0]).name} exited with {proc.returncode}; see "
                                       f"{self.dir / 'log'}")
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    @staticmethod
    def _wait(ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > end:
                raise SlurmUnavailable(f"{what} within {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.procs:
            subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
            end = time.monotonic() + 60
            while time.monotonic() < end and self._queue():
                time.sleep(1)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs = []

    # ------------------------------------------------------------------ jobs
    def _queue(self) -> List[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True)
        return out.stdout.split() if out.returncode == 0 else []

    def sbatch(self, args: List[str], cwd: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> str:
        proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {proc.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def signal_job(self, job_id: str, sig: str = "TERM") -> None:
        subprocess.run(["scancel", f"--signal={sig}", job_id], env=self.env, check=True)

    def wait(self, job_id: str, states=FINISHED, timeout: float = 900.0) -> Dict[str, str]:
        """Poll until the job is in one of ``states`` (default: finished); the job's record then."""
        end = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > end:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s")
            time.sleep(1)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="folder for the cluster's key, config, state and logs (default: a new "
                                      "temporary folder)")
    parser.add_argument("--cpus", type=int, help="CPUs the node offers (default: all of this machine's)")
    parser.add_argument("--install", action="store_true", help="apt-get install slurm-wlm munge when missing")
    parser.add_argument("--no-requeue-delay", action="store_true",
                        help="start requeued jobs after 11 s instead of SLURM's two-minute hold")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ... to run against the cluster")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give a command after --, e.g. -- sbatch --wait ... scripts/slurm/train.sbatch RECIPE.yaml")
    try:
        ensure_installed(install=args.install)
        with LocalSlurm(args.dir, cpus=args.cpus, requeue_delay=not args.no_requeue_delay) as slurm:
            print(f"local SLURM up: SLURM_CONF={slurm.conf} (node {slurm.node}, {slurm.cpus} CPUs)", file=sys.stderr)
            return subprocess.call(command, env=slurm.env)
    except SlurmUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
