"""`rankwise federate`: federated LoRA (LoRA-FAIR, FedIT, FFA-LoRA, stacking) as a Flower simulation, or with
`--deployment` on Flower's deployment runtime (a real SuperLink and SuperNodes as processes); LoRA inside the
pretrained encoder (`--mode encoder`, default) or on a head over cached features (`--mode head`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
ALL_STRATEGIES = ("lora-fair", "fedit", "ffa-lora", "stacking")


def register(app: typer.Typer) -> None:
    @app.command("federate")
    def federate(
        mode: str = typer.Option("encoder", help="encoder: LoRA on query/value inside the pretrained encoder (the paper's setting) | "
                                                 "head: a LoRA MLP head on cached frozen features (fast)."),
        strategy: str = typer.Option("lora-fair", help="lora-fair, fedit, ffa-lora, stacking, a comma list, or 'all'."),
        clients: int = typer.Option(8, min=1, help="Simulated clients (Flower supernodes); all take part every round."),
        rounds: int = typer.Option(20, min=1),
        alpha: float = typer.Option(0.5, help="Dirichlet label-skew concentration (smaller = more non-IID)."),
        iid: bool = typer.Option(False, "--iid", help="IID split instead of Dirichlet(alpha)."),
        rank: int = typer.Option(8, min=1, help="LoRA rank (of every client, unless --client-ranks)."),
        client_ranks: Optional[str] = typer.Option(None, help="Heterogeneous ranks, a comma list cycled over the clients (e.g. 4,8,16); the global rank is the largest."),
        lora_alpha: float = typer.Option(16.0, help="LoRA alpha (scale alpha/rank)."),
        solver: str = typer.Option("sgd", help="LoRA-FAIR server solver: sgd (the paper's 1 - cos + lam ||dB|| objective) | ridge (closed form)."),
        lam: float = typer.Option(0.01, help="LoRA-FAIR: the paper's lambda, weight of ||dB||_F in the sgd solver's objective."),
        ridge_lam: Optional[float] = typer.Option(None, help="LoRA-FAIR --solver ridge: weight of ||dB||_F^2 (default 0.01; not the same unit as --lam)."),
        server_steps: int = typer.Option(200, min=0, help="LoRA-FAIR --solver sgd: Adam steps per layer and round on the server."),
        server_lr: float = typer.Option(0.05, help="LoRA-FAIR --solver sgd: relative server learning rate."),
        lr: Optional[float] = typer.Option(None, help="Client learning rate (AdamW, constant); default 1e-3 (encoder) / 3e-3 (head)."),
        local_epochs: int = typer.Option(1, min=1),
        batch_size: int = typer.Option(32, min=1),
        hidden: int = typer.Option(128, min=1, help="--mode head: width of the adapted MLP head."),
        targets: str = typer.Option("query,value", help="--mode encoder: the encoder's linear layers that get LoRA."),
        train_size: int = typer.Option(3000, min=1),
        test_size: int = typer.Option(1000, min=1),
        max_length: int = typer.Option(64, min=8, help="Tokens per text for the encoder."),
        data: Optional[Path] = typer.Option(None, help="CSV/JSONL with text,label columns (default: embedded tweets)."),
        text_field: str = typer.Option("text"),
        label_field: str = typer.Option("label"),
        model: Optional[Path] = typer.Option(None, help="Pretrained encoder, a local transformers dir (default: embedded all-MiniLM-L6-v2)."),
        features: Optional[Path] = typer.Option(None, help="--mode head: pre-computed features (safetensors: train_x, train_y, test_x, test_y) instead of --data/--model."),
        output: Path = typer.Option(Path("runs/federate"), "--output", "-o", "--out", help="Output directory (results.json, accuracy.png, <strategy>/checkpoints)."),
        resume: bool = typer.Option(False, "--resume", help="Continue each strategy from its last round checkpoint."),
        round_timeout: float = typer.Option(300.0, help="Seconds to wait for clients each round; late clients are dropped."),
        workers: int = typer.Option(2, min=1, help="Clients trained in parallel (Ray actors, one CPU each)."),
        fail_client: Optional[int] = typer.Option(None, help="Fault injection: this client (0-based) fails..."),
        fail_round: int = typer.Option(2, help="...in this round..."),
        fail_mode: str = typer.Option("crash", help="...by raising ('crash') or sleeping past the timeout ('hang')."),
        seed: int = typer.Option(0),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda: where each client trains."),
        deployment: bool = typer.Option(False, "--deployment", help="Flower's deployment runtime instead of the simulation: a real "
                                        "SuperLink and one SuperNode per client as processes on 127.0.0.1 (free ports; --insecure "
                                        "unless --tls-dir). --fail-mode crash then kills that client's SuperNode for real."),
        tls_dir: Optional[Path] = typer.Option(None, help="With --deployment: TLS between SuperNodes and SuperLink, with the "
                                               "certificates in this directory (ca.crt, server.pem, server.key; see the federate guide)."),
    ) -> None:
        """Federated LoRA on a Flower simulation: per-round accuracy JSON and a plot comparing strategies."""
        from rankwise.core.console import print_error
        from rankwise.core.errors import ConfigError, RankwiseError
        from rankwise.federated import report
        from rankwise.federated.simulation import FaultSpec, FederatedRun, run_federated
        from rankwise.federated.encoder_task import EncoderSpec, cached_tokens, load_tokens
        from rankwise.federated.task import HeadSpec, cached_features, load_features

        names = list(ALL_STRATEGIES) if strategy == "all" else [s.strip() for s in strategy.split(",") if s.strip()]
        try:
            from rankwise.data.models import resolve_device

            device = resolve_device(device).type  # before the encoder runs: a bad --device fails at once
            if tls_dir is not None and not deployment:
                raise ConfigError("--tls-dir is used only with --deployment (the simulation has no network): add --deployment or drop --tls-dir")
            if fail_client is not None and not 0 <= fail_client < clients:
                raise ConfigError(f"--fail-client={fail_client} names no client: with --clients {clients} the clients are "
                                  f"0..{clients - 1}; the fault would never be injected")
            ranks = None
            if client_ranks is not None:
                try:
                    ranks = [int(r) for r in client_ranks.split(",") if r.strip()]
                except ValueError:
                    raise ConfigError(f"--client-ranks={client_ranks!r} is invalid: expected a comma list of positive integers, e.g. 4,8,16") from None
                if not ranks or min(ranks) < 1:
                    raise ConfigError(f"--client-ranks={client_ranks!r} is invalid: expected a comma list of positive integers, e.g. 4,8,16")
                rank = max(ranks)
            if mode not in ("encoder", "head"):
                raise ConfigError(f"--mode={mode!r} is invalid: expected 'encoder' (LoRA inside the encoder) or 'head' (cached features)")
            if mode == "encoder" and features is not None:
                raise ConfigError("--features holds pre-computed features, which only --mode head uses: add --mode head, "
                                  "or pass --data/--model so the encoder itself is fine-tuned")
            encoder, head = None, HeadSpec()
            if features is None:
                from rankwise.data.text import load_text_classification

                dataset = load_text_classification(data, train_size, test_size, seed, text_field, label_field)
                if mode == "encoder":
                    console.print(f"[bold]{dataset.summary()}[/bold]; tokenizing once (cached); LoRA on {targets} inside the encoder")
                    features = cached_tokens(dataset, model, max_length, cache_dir=output / "cache")
                else:
                    console.print(f"[bold]{dataset.summary()}[/bold]; encoding once with the frozen encoder (cached)...")
                    features = cached_features(dataset, model, max_length, cache_dir=output / "cache")
            if mode == "encoder":
                tensors = load_tokens(features)
                encoder = EncoderSpec(model=None if model is None else str(model), num_classes=int(tensors["train_y"].max()) + 1,
                                      rank=rank, lora_alpha=lora_alpha, targets=[t.strip() for t in targets.split(",") if t.strip()],
                                      lr=1e-3 if lr is None else lr, local_epochs=local_epochs, batch_size=batch_size, seed=seed)
            else:
                tensors = load_features(features)
                head = HeadSpec(in_features=int(tensors["train_x"].shape[1]), hidden=hidden, num_classes=int(tensors["train_y"].max()) + 1,
                                rank=rank, lora_alpha=lora_alpha, lr=3e-3 if lr is None else lr, local_epochs=local_epochs,
                                batch_size=batch_size, seed=seed)
            if ridge_lam is None:
                # before the paper's solver existed, --lam was the ridge weight: keep that meaning for --solver ridge
                ridge_lam = lam if solver == "ridge" else 0.01
                if solver == "ridge" and lam != 0.01:
                    console.print("[yellow]deprecated:[/yellow] --lam with --solver ridge is read as --ridge-lam; --lam now "
                                  "means the paper's lambda of --solver sgd. Pass --ridge-lam instead.")
            fault = FaultSpec(fail_client, fail_round, fail_mode, hang_seconds=round_timeout + 5) if fail_client is not None else None
            runs = [FederatedRun(features=str(features), strategy=name, clients=clients, rounds=rounds, alpha=None if iid else alpha,
                                 head=head, encoder=encoder, lam=lam, solver=solver,
                                 ridge_lam=ridge_lam, server_steps=server_steps, server_lr=server_lr, client_ranks=ranks, round_timeout=round_timeout, workers=workers, seed=seed, fault=fault, device=device) for name in names]
            for run in runs:
                columns = [TextColumn(f"[bold]{run.strategy}"), BarColumn(), MofNCompleteColumn(), TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn()]
                with Progress(*columns, console=console) as bar:
                    task = bar.add_task(run.strategy, total=rounds, acc="-")
                    advance = lambda row, task=task: bar.update(task, completed=row["round"], acc=f"{row['accuracy']:.3f}")  # noqa: E731
                    if deployment:
                        from rankwise.federated.deployment import run_federated_deployment

                        result = run_federated_deployment(run, output / run.strategy, resume=resume, on_round=advance, tls_dir=tls_dir)
                        for kill in result["killed"]:
                            console.print(f"[yellow]killed[/yellow] the SuperNode of client {kill['client']} in round {kill['round']} "
                                          f"(fault injection); the round went on with the others")
                    else:
                        result = run_federated(run, output / run.strategy, resume=resume, on_round=advance)
                results = report.record_result(output, run.strategy, run.fingerprint(), result)
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(2) from None
        split = "IID" if iid else f"Dirichlet alpha={alpha}"
        report.plot_comparison(results, output / report.PLOT_NAME, f"{mode} mode, {clients} clients, {split}, rank {client_ranks or rank}")
        table = Table(title=f"federated LoRA: {clients} clients, {rounds} rounds, {split}")
        for col in ("strategy", "final acc", "best acc", "dropped client-rounds", "seconds"):
            table.add_column(col)
        for name, r in sorted(results["strategies"].items()):
            table.add_row(name, f"{r['final_accuracy']:.4f}", f"{r['best_accuracy']:.4f}", str(r["dropped_client_rounds"]), f"{r['seconds'] or 0:.0f}")
        console.print(table)
        differ = report.settings_differ(results)
        if differ:
            console.print(f"[yellow]note:[/yellow] the runs in {output}/results.json differ in {differ}: compare with care")
        console.print(f"wrote {output}/{report.RESULTS_NAME} and {output}/{report.PLOT_NAME}")
