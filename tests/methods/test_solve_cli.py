"""`rankwise solve ...` end to end on .mtx / .npz / .npy files."""
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rankwise.cli import app

runner = CliRunner()


def test_complete_from_matrix_market(tmp_path):
    import scipy.io
    import scipy.sparse

    rng = np.random.default_rng(0)
    U, V = rng.standard_normal((120, 3)), rng.standard_normal((90, 3))
    mask = rng.random((120, 90)) < 0.3
    rows, cols = np.nonzero(mask)
    scipy.io.mmwrite(str(tmp_path / "obs.mtx"), scipy.sparse.coo_matrix(((U @ V.T)[rows, cols], (rows, cols)), shape=(120, 90)))
    out = tmp_path / "uv.npz"
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "obs.mtx"), "--rank", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out) as factors:
        assert np.linalg.norm(factors["U"] @ factors["V"].T - U @ V.T) / np.linalg.norm(U @ V.T) < 1e-6
    # the default --solver auto picked exact at rank 3 (issue 19 item 10); --solver sketch still runs sketched CG
    assert re.search(r"solver\s*│\s*exact", result.output), result.output
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "obs.mtx"), "--rank", "3", "--solver", "sketch", "--out", str(out)])
    assert result.exit_code == 0 and re.search(r"solver\s*│\s*sketch", result.output), result.output
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "obs.mtx"), "--rank", "3", "--solver", "fast"])
    assert result.exit_code == 2 and "auto" in result.output


def test_complete_from_npz_and_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", rows=np.array([0, 1]), cols=np.array([0, 1]), values=np.array([1.0, np.nan]), shape=np.array([3, 3]))
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "bad.npz"), "--rank", "1"])
    assert result.exit_code == 2 and "NaN" in result.output
    np.savez(tmp_path / "nokeys.npz", x=np.zeros(3))
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "nokeys.npz"), "--rank", "1"])
    assert result.exit_code == 2 and "rows" in result.output
    np.save(tmp_path / "dense.npy", np.zeros((3, 3)))
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "dense.npy"), "--rank", "1"])
    assert result.exit_code == 2 and "never a dense mask" in " ".join(result.output.split())
    result = runner.invoke(app, ["solve", "complete", str(tmp_path / "absent.npz"), "--rank", "1"])
    assert result.exit_code == 2 and "does not exist" in result.output


def sensing_npz(path, symmetric):
    g = torch.Generator().manual_seed(0)
    n, m = 10, 400
    Q, _ = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(torch.tensor([1.0, 0.6], dtype=torch.float64)) @ Q.T
    G = torch.randn(m, n, n, generator=g, dtype=torch.float64)
    A = (G + G.transpose(1, 2)) / 2 if symmetric else G / m**0.5
    np.savez(path, A=A.numpy(), y=(A * M).sum((1, 2)).numpy())
    return M.numpy()


def test_sense_and_subgm_commands(tmp_path):
    M = sensing_npz(tmp_path / "asym.npz", symmetric=False)
    result = runner.invoke(app, ["solve", "sense", str(tmp_path / "asym.npz"), "--rank", "3", "--iterations", "1500",
                                 "--out", str(tmp_path / "s.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as saved:
        assert np.linalg.norm(saved["M"] - M) / np.linalg.norm(M) < 1e-6
    M = sensing_npz(tmp_path / "sym.npz", symmetric=True)
    result = runner.invoke(app, ["solve", "subgm", str(tmp_path / "sym.npz"), "--rank", "4", "--iterations", "1500",
                                 "--out", str(tmp_path / "g.npz")])
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "g.npz") as saved:
        assert np.linalg.norm(saved["X"] - M) / np.linalg.norm(M) < 1e-6
    result = runner.invoke(app, ["solve", "subgm", str(tmp_path / "sym.npz"), "--rank", "11"])
    assert result.exit_code == 2 and "rank" in result.output


def test_eig_streams_rows_from_disk(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.standard_normal(30)
    v /= np.linalg.norm(v)
    A = rng.standard_normal((5000, 30)) + 3 * rng.standard_normal((5000, 1)) * v
    np.save(tmp_path / "rows.npy", A)
    out = tmp_path / "v.npy"
    result = runner.invoke(app, ["solve", "eig", str(tmp_path / "rows.npy"), "--chunk", "333", "--out", str(out)])
    assert result.exit_code == 0, result.output
    top = np.linalg.eigh(A.T @ A)[1][:, -1]
    assert abs(float(np.load(out) @ top)) > 0.99


def test_eig_bad_files(tmp_path):
    np.save(tmp_path / "vector.npy", np.zeros(5))
    result = runner.invoke(app, ["solve", "eig", str(tmp_path / "vector.npy")])
    assert result.exit_code == 2 and "(n, d)" in result.output
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    result = runner.invoke(app, ["solve", "eig", str(tmp_path / "junk.npy")])
    assert result.exit_code == 2 and "cannot be read" in result.output
