"""MoS spec checks (docs: /work/shared/specs/methods-adapters-b.md part B1 section 1)."""
import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters.mos import MosAdapter, export_lora, mos_parameter_count
from rankwise.core.errors import ConfigError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.up = nn.Linear(16, 32)

    def forward(self, x):
        return x + self.up(torch.tanh(self.q(x)))[..., :16]


class Stack(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _adapt(r=5, r_eq=2, p=1, l=4, **kw):
    torch.manual_seed(0)
    config = rankwise.MosConfig(r=r, equivalent_rank=r_eq, private_rank=p, shards_per_vector=l,
                                target_modules=["q", "up"], **kw)
    return rankwise.adapt(Stack(), config)


def _perturb_pools(model):
    with torch.no_grad():
        for p in model.shared["default"].parameters():
            p.normal_()


def test_zero_delta_at_init():
    model = _adapt()
    for name, delta in model.delta_weights().items():
        assert torch.count_nonzero(delta) == 0, name


def test_parameter_count_equals_lora_of_equivalent_rank():
    model = _adapt(r=5, r_eq=2)
    expected = mos_parameter_count(2, {"q": (4, 16, 16), "up": (4, 16, 32)})
    assert expected == 2 * 4 * (32 + 48)
    assert model.trainable_summary()["trainable"] == expected
    # independent of the active rank, the private rank and the shard count
    assert _adapt(r=3, r_eq=2, p=0, l=2).trainable_summary()["trainable"] == expected
    # LLaMA-2-7B, 7 projections, 32 blocks, R_eq = 2: the value logged by the reference runs.
    llama = {"q": (32, 4096, 4096), "k": (32, 4096, 4096), "v": (32, 4096, 4096), "o": (32, 4096, 4096),
             "gate": (32, 4096, 11008), "up": (32, 4096, 11008), "down": (32, 11008, 4096)}
    assert mos_parameter_count(2, llama) == 4_997_120


def test_pure_private_is_an_independent_lora_per_block():
    model = _adapt(r=2, r_eq=2, p=2, l=4)
    _perturb_pools(model)
    pool_a = model.shared["default"].pool_A["q_16x16"]
    for i in range(4):
        a, _ = model.model.blocks[i].q.adapters["default"].factors()
        torch.testing.assert_close(a, pool_a[i * 2 * 4:(i + 1) * 2 * 4].reshape(2, 16))


def test_rank_vectors_are_concatenated_shards():
    model = _adapt()
    _perturb_pools(model)
    adapter = model.model.blocks[2].up.adapters["default"]
    a, b = adapter.factors()
    pools = model.shared["default"]
    pa, pb = pools.pool_A["up_16x32"], pools.pool_B["up_16x32"]
    for j in range(5):
        torch.testing.assert_close(a[j], torch.cat([pa[adapter.index_A[j * 4 + k]] for k in range(4)]))
        torch.testing.assert_close(b[:, j], torch.cat([pb[adapter.index_B[j * 4 + k]] for k in range(4)]))
    # subset selection: the shared part is a subset of the shared segment without repeats; private rows at the end
    shared_rows = (2 - 1) * 4 * 4
    shared_a = adapter.index_A[: (5 - 1) * 4]
    assert len(set(shared_a.tolist())) == shared_a.numel() and int(shared_a.max()) < shared_rows
    assert adapter.index_A[-4:].tolist() == list(range(shared_rows + 2 * 4, shared_rows + 3 * 4))
    # pair dissociation: A and B pick different shared shards
    assert not torch.equal(adapter.index_A, adapter.index_B)


def test_pools_are_shared_not_copied():
    model = _adapt()
    pools = model.shared["default"]
    adapters = [layer.adapters["default"] for _, layer in model.adapted_layers()]
    assert all(a.shared is pools for a in adapters)
    ids = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == 4  # 2 module types x (A pool, B pool), each seen once
    assert all(isinstance(a, MosAdapter) and not list(a.parameters()) for a in adapters)


def test_gradient_reaches_only_the_layer_rows():
    model = _adapt()
    _perturb_pools(model)
    adapter = model.model.blocks[1].q.adapters["default"]
    x = torch.randn(3, 16)
    layer = model.model.blocks[1].q
    layer(x).pow(2).sum().backward()
    pools = model.shared["default"]
    grad_rows = set(torch.nonzero(pools.pool_A["q_16x16"].grad.abs().sum(1)).flatten().tolist())
    assert grad_rows == set(adapter.index_A.tolist())
    assert pools.pool_A["up_16x32"].grad is None
    # a private row of block 1 gets gradient from exactly one layer
    model.zero_grad()
    model(torch.randn(3, 16)).pow(2).sum().backward()
    private_row = int(adapter.index_A[-1])
    owners = [i for i in range(4) if private_row in model.model.blocks[i].q.adapters["default"].index_A.tolist()]
    assert owners == [1]


def test_export_to_lora_reproduces_forward_and_merge():
    model = _adapt()
    _perturb_pools(model)
    x = torch.randn(5, 16)
    before = model(x)
    scale = model.configs["default"].lora_alpha / 5
    for name, (a, b) in export_lora(model).items():
        layer = dict(model.adapted_layers())[name]
        torch.testing.assert_close(layer.adapters["default"].delta_weight(None), scale * b @ a)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


def test_same_seed_same_indices_and_saved_indices_reload(tmp_path):
    a, b = _adapt(seed=3), _adapt(seed=3)
    for (_, la), (_, lb) in zip(a.adapted_layers(), b.adapted_layers()):
        assert torch.equal(la.adapters["default"].index_A, lb.adapters["default"].index_A)
    c = _adapt(seed=4)
    assert not torch.equal(c.model.blocks[0].q.adapters["default"].index_A, a.model.blocks[0].q.adapters["default"].index_A)
    _perturb_pools(a)
    x = torch.randn(2, 16)
    reference = a(x)
    a.save_adapter(tmp_path)
    base = copy.deepcopy(a.unload())
    loaded = rankwise.load_adapter(base, tmp_path)
    torch.testing.assert_close(loaded(x), reference)


@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "r"), ({"equivalent_rank": 0}, "equivalent_rank"), ({"private_rank": 5}, "private_rank"),
    ({"private_rank": 4, "equivalent_rank": 4, "r": 8}, "r"), ({"shards_per_vector": 0}, "shards_per_vector"),
    ({"lora_alpha": -1}, "lora_alpha"), ({"seed": -1}, "seed"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        rankwise.MosConfig(target_modules=["x"], **kwargs)


def test_bad_layer_settings():
    with pytest.raises(ConfigError, match="shards_per_vector"):
        _adapt(l=3)
    with pytest.raises(ConfigError, match="too large"):
        _adapt(r=8, r_eq=2, p=1)  # 7 shared vectors from a shared segment of (2 - 1) * 4 = 4
