"""`rankwise pretrain`: train a small LLaMA-style LM from scratch on offline text with a low-rank method."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("pretrain")
    def pretrain_command(
        method: str = typer.Option("full", help="full | galore | dct | sltrain | lost"),
        corpus: str = typer.Option("kjv", help="kjv (apt bible-kjv) | fortunes (apt fortunes) | lee (pip gensim) | PATH.txt"),
        out: Path = typer.Option(Path("runs/pretrain"), "--output", "-o", "--out", help="output directory (model, metrics.json, val_ppl.png)"),
        steps: int = typer.Option(500, help="optimizer steps"),
        batch_size: int = typer.Option(16),
        seq_len: int = typer.Option(128, help="tokens (bytes) per sequence"),
        hidden_size: int = typer.Option(256),
        num_layers: int = typer.Option(4),
        num_heads: int = typer.Option(4),
        intermediate_size: int = typer.Option(688),
        lr: Optional[float] = typer.Option(None, help="peak learning rate (default per method)"),
        weight_decay: float = typer.Option(0.0),
        rank: Optional[int] = typer.Option(None, help="rank for galore/dct/sltrain/lost (default hidden_size/4)"),
        update_proj_gap: Optional[int] = typer.Option(None, help="projector refresh period in steps (default 200)"),
        galore_scale: float = typer.Option(0.25, help="GaLore's scale alpha"),
        sparsity: Optional[float] = typer.Option(None, help="SLTrain delta (0.03) or LOST rho (0.05)"),
        gamma: float = typer.Option(0.5, help="LOST low-rank/sparse mix"),
        per_layer: bool = typer.Option(False, help="galore/dct: update each layer inside backward"),
        dct_preset: str = typer.Option("tuned", help="dct: tuned (gap 200, stable slots) | paper (gap 1, reference slots)"),
        dct_error_feedback: bool = typer.Option(False, help="dct: error feedback (the reference's use_ef)"),
        eval_every: int = typer.Option(50, help="steps between validation perplexity measurements"),
        seed: int = typer.Option(0),
        threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)"),
        quiet: bool = typer.Option(False, help="no progress bar"),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda"),
    ) -> None:
        """Pretrain a small LLaMA-style causal LM from scratch on real offline text."""
        import torch
        from rich.console import Console
        from rich.table import Table

        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError
        from rankwise.pretrain.recipe import PretrainConfig, pretrain

        console = Console()
        if threads:
            torch.set_num_threads(threads)
        try:
            config = PretrainConfig(method=method, corpus=corpus, hidden_size=hidden_size, num_layers=num_layers,
                                    num_heads=num_heads, intermediate_size=intermediate_size, seq_len=seq_len,
                                    batch_size=batch_size, steps=steps, lr=lr, weight_decay=weight_decay, rank=rank,
                                    update_proj_gap=update_proj_gap, galore_scale=galore_scale, sparsity=sparsity,
                                    gamma=gamma, per_layer=per_layer, dct_preset=dct_preset,
                                    dct_error_feedback=dct_error_feedback, eval_every=eval_every, seed=seed)
            metrics = pretrain(config, out, show_progress=not quiet, device=device)
        except RankwiseError as error:
            print_error(error, console)
            raise typer.Exit(code=2) from error
        table = Table(title=f"pretrain {method} on {corpus}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("params", "attn_mlp_params", "optimizer_state_bytes", "projected_matrices_state_bytes", "tokens",
                    "final_val_ppl", "step_time_median_s", "peak_rss_mb", "wall_seconds"):
            value = metrics[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        console.print(table)
        weights = out / "model.safetensors"
        if weights.is_file():
            console.print(f"wrote {weights} (a transformers directory: AutoModelForCausalLM.from_pretrained loads it), "
                          f"{out / 'metrics.json'}, {out / 'val_ppl.png'}")
        else:
            console.print(f"wrote {out / 'pretrain_factors.safetensors'} (load it with rankwise.pretrain.load_run; "
                          f"not a transformers model), {out / 'metrics.json'}, {out / 'val_ppl.png'}")

    @app.command("welore")
    def welore_command(
        run: Path = typer.Argument(..., help="the --out directory of a `rankwise pretrain` run (ideally --method galore)"),
        out: Optional[Path] = typer.Option(None, "--output", "-o", "--out", help="output directory (default RUN/welore)"),
        target: float = typer.Option(0.5, help="global rank reduction for the fine-tuned model"),
        sweep: str = typer.Option("0.3,0.5,0.7", help="comma-separated reductions for the trade-off sweep"),
        min_ratio: float = typer.Option(0.4999, help="a matrix is factorised (LRC) if its own reduction exceeds this"),
        finetune_steps: int = typer.Option(100, help="steps of LRC-only fine-tuning"),
        lr: float = typer.Option(1e-4),
    ) -> None:
        """WeLore: compress the layers whose weights became low-rank, fine-tune only those, report the trade-off."""
        from rich.console import Console
        from rich.table import Table

        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError
        from rankwise.pretrain.welore_run import welore_on_run

        console = Console()
        out_dir = out or run / "welore"
        try:
            targets = tuple(float(t) for t in sweep.split(",") if t.strip())
            result = welore_on_run(run, out_dir, targets, target, min_ratio, finetune_steps, lr)
        except (RankwiseError, ValueError) as error:
            print_error(error, console)
            raise typer.Exit(code=2) from error
        table = Table(title=f"WeLore on {run} (base ppl {result['base_ppl']:.3f}, {result['base_params']} params)")
        for column in ("reduction", "WeLore ppl", "WeLore params", "uniform ppl", "uniform params"):
            table.add_column(column, justify="right")
        for row in result["sweep"]:
            table.add_row(f"{row['target_reduction']:.0%}", f"{row['welore_ppl']:.3f}", str(row["welore_params"]),
                          f"{row['uniform_ppl']:.3f}", str(row["uniform_params"]))
        console.print(table)
        tuned = result["finetune"]
        console.print(f"target {target:.0%}: {tuned['lrc_layers']} LRC layers, {tuned['trainable_params']} trainable; "
                      f"ppl {tuned['ppl_compressed']:.3f} -> {tuned['ppl_finetuned']:.3f} after {finetune_steps} steps")
        console.print(f"wrote {out_dir / 'welore_report.json'}, {out_dir / 'welore_tradeoff.png'}")
