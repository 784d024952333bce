"""Shared federated fixtures: a small 3-class Gaussian feature set (head mode), the same for every test module."""
import pytest
import torch

from rankwise.federated.task import save_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 12, generator=g) * 2

    def sample(n):
        y = torch.randint(0, 3, (n,), generator=g)
        return centres[y] + torch.randn(n, 12, generator=g), y

    (train_x, train_y), (test_x, test_y) = sample(240), sample(90)
    path = tmp_path_factory.mktemp("features") / "features.safetensors"
    return save_features(path, {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y})
