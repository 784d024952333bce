"""WeLore flow on real pretraining runs (arXiv 2407.11239): GaLore-trained model -> find the layers whose
weights became low-rank -> compress them -> fine-tune only those; the full-rank AdamW run as the control.

Input: `rankwise pretrain` runs (default: those bench/pretrain_methods.py leaves in ROOT/runs/pretrain_methods).
Per run:
  spectra      per-layer stable rank and the kept rank WeLore gives each matrix at every target reduction
  sweep        validation perplexity vs parameters at each global rank reduction, no fine-tuning:
               welore_all (every pruned matrix factorised, min_ratio 0: the paper's compression script),
               welore_lrc (only matrices pruned > min_ratio factorised, the rest kept dense), uniform (same
               ratio for every matrix)
  finetune     at `--target`, the same batches for each arm:
               lrc_only     WeLore: LRC factors trainable, N-LRC / embeddings / head frozen
               all_params   the same compressed model with every parameter trainable
               dense        the uncompressed model, every parameter trainable (how much is just more training)
JSON: results/welore_flow.json; plot: results/welore_flow.png.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from rankwise.compress.welore import WeLoreConfig, fine_tune, uniform_compress, weight_spectra, welore_compress
from rankwise.linalg import stable_rank
from rankwise.pretrain.recipe import load_run, perplexity, split_tokens, validation_windows
from timing import RESULTS, write_json

ROOT = Path(__file__).resolve().parents[1]


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def study_run(run_dir: Path, args) -> dict:
    model, config = load_run(run_dir)
    train, val = split_tokens(config)
    windows = validation_windows(val, config)
    ppl = lambda m: perplexity(m, windows, config.batch_size)  # noqa: E731
    base_ppl, base_params = ppl(model), params(model)
    spectra = weight_spectra(model)
    layers = {name: {"shape": list(module.weight.shape), "stable_rank": stable_rank(module.weight.detach())}
              for name, module in model.named_modules() if name in spectra}

    sweep = []
    for reduction in args.sweep:
        row = {"target_reduction": reduction}
        for arm, min_ratio in (("welore_all", 0.0), ("welore_lrc", args.min_ratio)):
            compressed, report = welore_compress(copy.deepcopy(model), WeLoreConfig(reduction, min_ratio=min_ratio),
                                                 spectra)
            row[arm] = {"ppl": ppl(compressed), "params": params(compressed), "lrc_layers": report["lrc_layers"],
                        "achieved_reduction": report["global_reduction"], "threshold": report["threshold"]}
            if arm == "welore_all":
                for name, layer in report["layers"].items():
                    layers[name].setdefault("kept_rank", {})[f"{reduction:g}"] = layer["kept_rank"]
        uniform = uniform_compress(copy.deepcopy(model), reduction)
        row["uniform"] = {"ppl": ppl(uniform), "params": params(uniform)}
        sweep.append(row)
        print(run_dir.name, f"{reduction:.0%}", {k: round(v["ppl"], 3) for k, v in row.items() if isinstance(v, dict)},
              flush=True)

    compressed, report = welore_compress(copy.deepcopy(model), WeLoreConfig(args.target, min_ratio=args.min_ratio),
                                         spectra)
    compressed_ppl = ppl(compressed)
    arms = {"lrc_only": compressed, "all_params": copy.deepcopy(compressed), "dense": copy.deepcopy(model)}
    for p in arms["all_params"].parameters():
        p.requires_grad_(True)
    for p in arms["dense"].parameters():
        p.requires_grad_(True)
    starts = torch.randint(0, len(train) - config.seq_len, (args.finetune_steps, config.batch_size),
                           generator=torch.Generator().manual_seed(args.seed))

    def loss_at_step(m, step):  # the same batches for every arm
        batch = torch.stack([train[s:s + config.seq_len] for s in starts[step]])
        return m(input_ids=batch, labels=batch).loss

    finetune = {}
    for arm, m in arms.items():
        if not trainable(m):
            finetune[arm] = {"skipped": "no LRC layer at this target and min_ratio"}
            continue
        tick = time.perf_counter()
        losses = fine_tune(m, loss_at_step, args.finetune_steps, args.lr)
        seconds = time.perf_counter() - tick
        finetune[arm] = {"trainable_params": trainable(m), "params": params(m),
                         "ppl_before": base_ppl if arm == "dense" else compressed_ppl, "ppl_after": ppl(m),
                         "seconds_per_step": seconds / args.finetune_steps,
                         "train_loss_first10": statistics.fmean(losses[:10]),
                         "train_loss_last10": statistics.fmean(losses[-10:])}
        print(run_dir.name, arm, finetune[arm], flush=True)
    return {"run": str(run_dir), "method": config.method, "steps": config.steps, "rank": config.rank,
            "base_ppl": base_ppl, "base_params": base_params, "layers": layers, "sweep": sweep,
            "finetune": {"target_reduction": args.target, "min_ratio": args.min_ratio, "threshold": report["threshold"],
                         "achieved_reduction": report["global_reduction"], "lrc_layers": report["lrc_layers"],
                         "lrc_names": [n for n, v in report["layers"].items() if v["lrc"]],
                         "compressed_params": report["params_after"], "steps": args.finetune_steps, "lr": args.lr,
                         "arms": finetune}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        for arm, style in (("welore_all", "o-"), ("welore_lrc", "^-"), ("uniform", "s--")):
            xs = [row[arm]["params"] / result["base_params"] for row in result["sweep"]]
            ys = [row[arm]["ppl"] for row in result["sweep"]]
            ax.plot(xs, ys, style, label=arm)
            for row, x, y in zip(result["sweep"], xs, ys):
                ax.annotate(f"{row['target_reduction']:.0%}", (x, y), fontsize=7)
        ax.axhline(result["base_ppl"], color="gray", linestyle=":", label="uncompressed")
        ax.set_xlabel("parameters / uncompressed")
        ax.set_ylabel("validation perplexity (per byte)")
        ax.set_yscale("log")
        ax.set_title(f"{name} run ({result['method']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", type=Path,
                        default=[ROOT / "runs" / "pretrain_methods" / "galore", ROOT / "runs" / "pretrain_methods" / "full"])
    parser.add_argument("--sweep", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--min-ratio", type=float, default=0.4999)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {run.name: study_run(run, args) for run in args.runs}
    config = {k: ([str(x) for x in v] if k == "runs" else v) for k, v in vars(args).items()}
    path = write_json("welore_flow", {"config": config, "runs": results})
    plot(results, RESULTS / "welore_flow.png")
    print("->", path)


if __name__ == "__main__":
    main()
