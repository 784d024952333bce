"""WeLore on a `rankwise pretrain` run: compression/quality sweep against uniform truncation, then an
LRC-only fine-tune at one target (see rankwise/compress/welore.py, arXiv 2407.11239)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from rankwise.compress.welore import WeLoreConfig, fine_tune, uniform_compress, weight_spectra, welore_compress
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.pretrain.recipe import load_run, perplexity, split_tokens, validation_windows


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def welore_on_run(run_dir: str | Path, out_dir: str | Path, targets=(0.3, 0.5, 0.7), target: float = 0.5,
                  min_ratio: float = 0.4999, finetune_steps: int = 100, lr: float = 1e-4, seed: int = 0) -> dict:
    """Returns (and writes to `out_dir/welore_report.json`, `out_dir/welore_tradeoff.png`) the report."""
    model, config = load_run(run_dir)
    main_config = WeLoreConfig(target_reduction=target, min_ratio=min_ratio)  # validates before any work
    train, val = split_tokens(config)
    windows = validation_windows(val, config)
    base_ppl = perplexity(model, windows, config.batch_size)
    spectra = weight_spectra(model)
    sweep = []
    for reduction in targets:
        # compression only: every matrix with any pruning is factorised (min_ratio 0, the paper's script)
        compressed, report = welore_compress(copy.deepcopy(model), WeLoreConfig(reduction, min_ratio=0.0), spectra)
        uniform = uniform_compress(copy.deepcopy(model), reduction)
        sweep.append({"target_reduction": reduction, "achieved_reduction": report["global_reduction"],
                      "welore_ppl": perplexity(compressed, windows, config.batch_size), "welore_params": _params(compressed),
                      "uniform_ppl": perplexity(uniform, windows, config.batch_size), "uniform_params": _params(uniform),
                      "kept_ranks": {name: layer["kept_rank"] for name, layer in report["layers"].items()}})
    compressed, report = welore_compress(copy.deepcopy(model), main_config, spectra)
    ppl_compressed = perplexity(compressed, windows, config.batch_size)
    generator = torch.Generator().manual_seed(seed)

    def loss_at_step(m, step):
        starts = torch.randint(0, len(train) - config.seq_len, (config.batch_size,), generator=generator)
        batch = torch.stack([train[s:s + config.seq_len] for s in starts])
        return m(input_ids=batch, labels=batch).loss

    losses = fine_tune(compressed, loss_at_step, finetune_steps, lr) if report["trainable_params"] else []
    result = {"run": str(run_dir), "method": config.method, "base_ppl": base_ppl, "base_params": _params(model),
              "sweep": sweep, "finetune": {"target_reduction": target, "min_ratio": min_ratio, **report,
                                           "ppl_compressed": ppl_compressed,
                                           "ppl_finetuned": perplexity(compressed, windows, config.batch_size),
                                           "steps": finetune_steps, "lr": lr, "losses": losses}}
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "welore_report.json", json.dumps(result, indent=2))
    plot_tradeoff(result, out_dir / "welore_tradeoff.png")
    return result


def plot_tradeoff(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sweep = result["sweep"]
    for arm, style in (("welore", "o-"), ("uniform", "s--")):
        ax.plot([row[f"{arm}_params"] for row in sweep], [row[f"{arm}_ppl"] for row in sweep], style, label=arm)
        for row in sweep:
            ax.annotate(f"{row['target_reduction']:.0%}", (row[f"{arm}_params"], row[f"{arm}_ppl"]), fontsize=7)
    ax.axhline(result["base_ppl"], color="gray", linestyle=":", label="uncompressed")
    ax.set_xlabel("parameters")
    ax.set_ylabel("validation perplexity (per byte)")
    ax.set_yscale("log")
    ax.set_title(f"WeLore vs uniform rank reduction ({result['method']} run)")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
