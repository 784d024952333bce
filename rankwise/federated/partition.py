"""Split a labelled training set across federated clients: IID, or label-skewed with a Dirichlet prior.

Dirichlet non-IID (Hsu, Qi, Brown 2019, arXiv 1909.06335): for every class c draw q_c ~ Dir(alpha * 1_K) and
give client k a fraction q_c[k] of that class's examples. Small alpha (0.1) gives each client a few classes;
large alpha (100) approaches IID. Both splits are pure functions of (labels, clients, alpha, seed).
"""
from __future__ import annotations

import numpy as np

from rankwise.core.errors import ConfigError


def iid_partition(num_examples: int, num_clients: int, seed: int = 0) -> list[list[int]]:
    """A shuffled split into `num_clients` parts whose sizes differ by at most one."""
    _check(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels, num_clients: int, alpha: float, seed: int = 0, min_size: int = 2, max_tries: int = 100) -> list[list[int]]:
    """Label-skewed split: each class is divided across clients by proportions drawn from Dir(alpha).

    Redraws (up to `max_tries`) until every client has at least `min_size` examples.
    """
    labels = np.asarray(labels)
    _check(len(labels), num_clients)
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha={alpha!r} is invalid: expected a number > 0 (e.g. 0.5; larger is closer to IID)")
    if len(labels) < num_clients * min_size:
        raise ConfigError(f"{len(labels)} examples cannot give {num_clients} clients {min_size} each: use fewer clients")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(
        f"could not give every one of {num_clients} clients >= {min_size} examples with alpha={alpha} "
        f"in {max_tries} draws: raise alpha, use fewer clients or more data"
    )


def partition(labels, num_clients: int, alpha: float | None, seed: int = 0) -> list[list[int]]:
    """`alpha=None`: IID; otherwise Dirichlet(alpha) label skew."""
    return iid_partition(len(labels), num_clients, seed) if alpha is None else dirichlet_partition(labels, num_clients, alpha, seed)


def _check(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"clients={num_clients} is invalid: expected an integer >= 1")
    if num_examples < num_clients:
        raise ConfigError(f"{num_examples} examples cannot be split across {num_clients} clients")
