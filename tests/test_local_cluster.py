"""scripts/slurm/local_cluster.py without starting SLURM (the real cluster runs in tests/test_slurm.py, slow): the
config it writes, and one-line reasons where it cannot run."""
import pytest

from scripts.slurm import local_cluster
from scripts.slurm.local_cluster import LocalSlurm, SlurmUnavailable, ensure_installed


def test_the_config_describes_this_node_with_its_own_munge_socket_and_state(tmp_path):
    cluster = LocalSlurm(str(tmp_path), cpus=3)
    conf = dict(line.split("=", 1) for line in cluster._slurm_conf(tmp_path / "munge.socket").splitlines()
                if "=" in line and not line.startswith(("NodeName", "PartitionName")))
    assert conf["AuthInfo"] == f"socket={tmp_path / 'munge.socket'}"
    assert conf["StateSaveLocation"] == str(tmp_path / "state") and conf["SlurmctldHost"] == cluster.node
    assert conf["SlurmctldPort"] != conf["SlurmdPort"] and conf["JobRequeue"] == "1"
    node = next(line for line in cluster._slurm_conf(tmp_path / "s").splitlines() if line.startswith("NodeName"))
    assert node == f"NodeName={cluster.node} CPUs=3 State=UNKNOWN"
    # a requeued job waits for the job credential to expire: 120 s by default, 10 s without the delay
    quick = LocalSlurm(str(tmp_path), cpus=3, requeue_delay=False)._slurm_conf(tmp_path / "m.socket")
    assert f"AuthInfo=socket={tmp_path / 'm.socket'},cred_expire=10" in quick.splitlines()


def test_not_root_is_a_clear_reason(monkeypatch):
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(SlurmUnavailable, match="needs root"):
        ensure_installed(install=False)


def test_missing_programs_are_named_with_the_packages_to_install(monkeypatch):
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(local_cluster, "missing_binaries", lambda: ["slurmctld", "munged"])
    with pytest.raises(SlurmUnavailable, match=r"slurmctld, munged not found: install the slurm-wlm and munge"):
        ensure_installed(install=False)


def test_the_script_says_why_in_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    assert local_cluster.main(["--", "sinfo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: a local SLURM needs root (slurmd starts jobs as their users); run as root"]
    with pytest.raises(SystemExit) as stop:
        local_cluster.main([])  # no command
    assert stop.value.code == 2
