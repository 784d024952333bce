"""Flower's deployment runtime: a real SuperLink and 2 SuperNodes as processes on 127.0.0.1.

Each ClientApp message runs in a fresh `flwr-clientapp` process (Flower's subprocess isolation), so a round
costs an interpreter start + import of torch and rankwise on every client: seconds in CI, more on a loaded
machine. The timeouts below are generous for that reason; a healthy run never waits for them.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.core.errors import ConfigError

pytest.importorskip("flwr")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]




def alive(pids):
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_two_supernodes_a_killed_one_is_tolerated_and_no_process_is_left(features, tmp_path):
    # client 1's SuperNode is SIGKILLed while it holds its round-2 message; round 2 aggregates client 0 only
    out = tmp_path / "run"
    args = ["federate", "--deployment", "--mode", "head", "--features", str(features), "--strategy", "fedit", "--clients", "2", "--rounds", "2",
            "--hidden", "12", "--rank", "4", "--lr", "0.01", "--output", str(out), "--fail-client", "1", "--fail-round", "2",
            "--round-timeout", "150"]
    result = CliRunner().invoke(app, args)
    work = out / "fedit" / "deployment"
    logs = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted((work / "logs").glob("*.log")))
    assert result.exit_code == 0, result.output + logs
    assert "killed the SuperNode of client 1 in round 2" in result.output
    record = json.loads((out / "results.json").read_text())["strategies"]["fedit"]
    history = record["history"]
    assert [(f["round"], f["clients"]) for f in record["failures"]] == [(2, [1])]  # the report names node and round
    assert [h["round"] for h in history] == [0, 1, 2], logs
    assert [h["answered"] for h in history[1:]] == [2, 1], logs        # both in round 1, the survivor in round 2
    assert history[1]["failed_clients"] == [] and history[2]["failed_clients"] == [1]
    assert history[2]["accuracy"] > history[0]["accuracy"]               # the survivor's update was aggregated
    assert (work / "logs" / "superlink.log").stat().st_size > 0
    assert (work / "logs" / "supernode-0.log").stat().st_size > 0
    pids = json.loads((work / "pids.json").read_text())
    assert len(pids) >= 3 + 2  # superlink, 2 supernodes, and the SuperExec processes they spawned
    assert alive(pids) == []


def test_ctrl_c_stops_every_flower_process(features, tmp_path):
    out = tmp_path / "interrupted"
    code = ("import torch; torch.set_num_threads(1)\n"
            "from rankwise.cli import main\n"
            "import sys; sys.argv = ['rankwise'] + sys.argv[1:]; main()\n")
    args = ["federate", "--deployment", "--mode", "head", "--features", str(features), "--strategy", "fedit", "--clients", "2", "--rounds", "50",
            "--hidden", "12", "--rank", "4", "--output", str(out)]
    # the driver's output goes to a file: an unread PIPE fills up (progress bar, log tails) and blocks the driver
    driver_log = tmp_path / "driver.log"
    with driver_log.open("wb") as sink:
        # SIG_DFL for SIGINT in the child: a test run started in the background (CI, `cmd &`) inherits SIGINT
        # *ignored*, and Python then never turns Ctrl-C into KeyboardInterrupt, as a terminal user's would be
        driver = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids_file = out / "fedit" / "deployment" / "pids.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (pids_file.is_file() and len(json.loads(pids_file.read_text() or "[]")) >= 5):
        assert driver.poll() is None, driver_log.read_text(errors="replace")
        time.sleep(0.5)
    assert pids_file.is_file(), "the deployment never started its processes"
    driver.send_signal(signal.SIGINT)
    try:
        driver.wait(timeout=120)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"the driver did not exit within 120 s of Ctrl-C:\n{driver_log.read_text(errors='replace')[-4000:]}")
    pids = json.loads(pids_file.read_text())
    time.sleep(1.0)
    assert alive(pids) == [], f"left running: {alive(pids)}"
    assert driver.returncode != 0


def test_tls_dir_needs_the_three_files_and_the_deployment(features, tmp_path):
    from rankwise.federated.deployment import TlsFiles

    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(ConfigError, match="server.pem"):
        TlsFiles.from_dir(tmp_path)
    result = CliRunner().invoke(app, ["federate", "--mode", "head", "--features", str(features), "--tls-dir", str(tmp_path), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--deployment" in result.output


def test_the_experiment_survives_the_run_config_round_trip(features):
    from rankwise.federated.deployment import AppSettings, DeployedRun, decode, encode
    from rankwise.federated.simulation import FaultSpec
    from rankwise.federated.task import HeadSpec

    run = DeployedRun(features=str(features), strategy="lora-fair", clients=3, head=HeadSpec(in_features=12, hidden=16),
                      fault=FaultSpec(1, 2, "hang"))
    settings = AppSettings(run=run, output="/tmp/x", resume=True, kill_client=1, kill_round=2)
    back = decode(json.loads(json.dumps(encode(settings))))
    assert back == settings and isinstance(back.run.head, HeadSpec) and isinstance(back.run.fault, FaultSpec)
    assert back.run.make_strategy().min_available_nodes == 1  # a dead node must not block the next round
    with pytest.raises(ConfigError, match="only rankwise classes"):
        decode({"__dataclass__": "os:system", "fields": {}})


def make_test_certificates(directory: Path) -> Path:
    """A throw-away CA and a SuperLink certificate for 127.0.0.1, with the openssl commands the guide shows."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        "req -x509 -newkey rsa:2048 -nodes -days 2 -keyout ca.key -out ca.crt -subj /CN=rankwise-test-CA",
        "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1",
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.pem",
    ):
        subprocess.run(["openssl", *cmd.split()], cwd=directory, check=True, capture_output=True)
    return directory


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="openssl is needed to make the test certificates")
def test_tls_run_with_user_certificates(features, tmp_path):
    from rankwise.federated.deployment import run_federated_deployment
    from rankwise.federated.simulation import FederatedRun
    from rankwise.federated.task import HeadSpec

    certs = make_test_certificates(tmp_path / "certs")
    run = FederatedRun(features=str(features), strategy="lora-fair", clients=2, rounds=1, round_timeout=150.0,
                       head=HeadSpec(in_features=12, hidden=12, num_classes=3, rank=4, lr=0.01))
    result = run_federated_deployment(run, tmp_path / "tls", tls_dir=certs)
    link_log = (Path(result["logs"]) / "superlink.log").read_text(errors="replace")
    assert result["tls"] and "--insecure" not in link_log, link_log[-2000:]
    assert [h["answered"] for h in result["history"]] == [0, 2], link_log[-2000:]
    assert alive(result["pids"]) == []
