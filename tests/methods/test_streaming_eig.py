"""Spec checks for the random-order streaming top eigenvector (arXiv 2412.11963), methods-theory.md 4(a)."""
import pytest
import torch

from rankwise import ConfigError, ShapeError
from rankwise.solvers.streaming_eig import streaming_top_eigenvector


def heavy_stream(c, seed=0, d=100, n=20000, h=10):
    g = torch.Generator().manual_seed(seed)
    light = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v /= v.norm()
    heavy = (c * n / h) ** 0.5 * (v + 0.05 * torch.randn(h, d, generator=g, dtype=torch.float64))
    A = torch.cat([light, heavy])[torch.randperm(n + h, generator=g)]
    eigenvalues, eigenvectors = torch.linalg.eigh(A.T @ A)  # the full-matrix reference
    return A, eigenvectors[:, -1], float(eigenvalues[-1] / eigenvalues[-2])


@pytest.fixture(scope="module")
def stream():
    return heavy_stream(c=10)


def test_heavy_aware_block_power_matches_eigh(stream):
    A, v1, gap = stream
    assert 6 < gap < 10  # R ~ 7.6 in the spec
    heavy_aware = streaming_top_eigenvector(A, reference=v1)
    plain = streaming_top_eigenvector(A, handle_heavy=False, reference=v1)
    correlation = abs(float(heavy_aware.solution @ v1))
    assert correlation >= 0.99
    assert correlation >= abs(float(plain.solution @ v1)) + 0.05
    assert heavy_aware.history["correlation"][-1] == pytest.approx(correlation)
    assert heavy_aware.info["heavy_rows"] == 10
    assert (10 + 2) * 100 <= heavy_aware.info["stored_floats"] <= (10 + 2 + 100) * 100  # (h + k + 2) d, k <= dL/B: not n d / B


def test_chunked_stream_equals_tensor_input(stream):
    A, v1, _ = stream
    whole = streaming_top_eigenvector(A)
    chunked = streaming_top_eigenvector(iter(A.split(37)), n_rows=A.shape[0])
    single_rows = streaming_top_eigenvector((row for row in A[:3000]), n_rows=3000)
    assert torch.allclose(whole.solution, chunked.solution, atol=1e-10)
    assert single_rows.info["rows_seen"] == 3000


def test_heavy_row_first_in_the_stream_is_still_caught():
    A, v1, _ = heavy_stream(c=10, seed=1)
    norms = (A * A).sum(1)
    order = torch.argsort(norms, descending=True)  # every heavy row first: the worst case for block 1
    A = torch.cat([A[order[:10]], A[order[10:]][torch.randperm(A.shape[0] - 10)]])
    result = streaming_top_eigenvector(A, reference=v1)
    assert result.info["heavy_rows"] == 10
    assert abs(float(result.solution @ v1)) >= 0.99


def test_bad_inputs():
    with pytest.raises(ShapeError, match="empty"):
        streaming_top_eigenvector(iter([]), n_rows=5)
    with pytest.raises(ConfigError, match="n_rows"):
        streaming_top_eigenvector(iter([torch.randn(3, 4)]))
    with pytest.raises(ShapeError, match="NaN"):
        streaming_top_eigenvector(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ShapeError, match="matrix"):
        streaming_top_eigenvector(torch.randn(5))
    with pytest.raises(ConfigError, match="blocks"):
        streaming_top_eigenvector(torch.randn(4, 3), blocks=10)
    with pytest.raises(ShapeError, match="width"):
        streaming_top_eigenvector(iter([torch.randn(3, 4), torch.randn(3, 5)]), n_rows=6, blocks=1)


def _floats_held_by_live_tensors(exclude_storages):
    """Sum of the float64 storages of every live tensor (found by the garbage collector), minus `exclude`."""
    import gc

    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.dtype == torch.float64:
            storage = obj.untyped_storage()
            if storage.data_ptr() not in exclude_storages:
                storages[storage.data_ptr()] = storage.nbytes() // 8
    return sum(storages.values())


def test_memory_held_is_heavy_rows_not_a_block_measured_on_live_tensors(stream):
    """Issue 19 item 9: block 1 used to hold every row (n d / B floats); now what is held is O((h + dL/B) d)."""
    A, v1, _ = stream
    n, d = A.shape
    A = A[:6000]  # 6000 rows, 6 heavy-ish among them or none: the point is what block 1 holds
    n = A.shape[0]
    peak = {"floats": 0, "before": None}
    exclude = {A.untyped_storage().data_ptr(), v1.untyped_storage().data_ptr()}

    def rows_one_at_a_time():
        for i in range(n):
            if i % 100 == 0:  # measure what the solver holds between rows (the row being yielded excluded)
                live = _floats_held_by_live_tensors(exclude)
                peak["before"] = live if peak["before"] is None else peak["before"]  # i = 0: the solver holds nothing yet
                peak["floats"] = max(peak["floats"], live - peak["before"])
            yield A[i].clone()

    result = streaming_top_eigenvector(rows_one_at_a_time(), n_rows=n, blocks=10)
    block_floats = n // 10 * d
    # measured: far below one block of rows, and within what the solver reports (+ a few d-vectors of scratch)
    assert peak["floats"] < block_floats / 4
    assert peak["floats"] <= result.info["stored_floats"] + 8 * d
    assert result.info["stored_floats"] < block_floats / 4
    assert result.info["stored_floats"] >= (result.info["heavy_rows"] + 2) * d
    # same answer as the whole-tensor call (the early settling of light rows is exact)
    assert torch.allclose(result.solution, streaming_top_eigenvector(A, blocks=10).solution, atol=1e-10)
