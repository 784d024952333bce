"""`rankwise federate --device`: fast checks (no Flower simulation is started)."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.core.errors import ConfigError
from rankwise.federated.simulation import FederatedRun, client_round, initial_state
from rankwise.federated.task import HeadSpec, save_features


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["federate", "--features", str(tmp_path / "none.safetensors"), "--device", "cuda",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
    assert "Traceback" not in result.output
    with pytest.raises(ConfigError, match="device"):
        FederatedRun(features="x", device="cuda")


def test_client_round_on_cpu_returns_cpu_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 12, generator=g), torch.randint(0, 3, (40,), generator=g)
    path = save_features(tmp_path / "f.safetensors", {"train_x": x, "train_y": y, "test_x": x, "test_y": y})
    head = HeadSpec(in_features=12, hidden=16, num_classes=3, rank=4, batch_size=8)
    run = FederatedRun(features=str(path), strategy="fedit", clients=2, rounds=1, head=head, device="auto")
    assert run.device in ("cpu", "cuda") and "device" not in run.fingerprint()
    upload, info = client_round(run, 0, 1, initial_state(run), train_A=True)
    assert info["num-examples"] > 0 and all(t.device.type == "cpu" for t in upload.values())
    assert any(not torch.equal(upload[k], v) for k, v in initial_state(run).items() if k in upload)
