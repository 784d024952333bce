"""Export any rankwise adapter as a plain LoRA that PEFT, vLLM and SGLang load.

Each adapted layer's exact update `delta_weight` (canonical layout, see `core/layer.py`) is split by a
truncated SVD into LoRA factors with scaling 1 (`lora_alpha == r` per layer):

    ΔW (out x in·k)  ≈  B A,   B = U_r sqrt(S_r) (out x r),   A = sqrt(S_r) Vh_r (r x in·k)
    relative error   =  ||ΔW - B A||_F / ||ΔW||_F  =  sqrt(Σ_{i>r} s_i²) / sqrt(Σ_i s_i²)

Conv kernels become PEFT's conv LoRA (A: r x in x k..., B: out x r x 1...), embeddings PEFT's
`lora_embedding_A/B`. `rank="auto"` picks, per layer, the smallest rank whose relative error is
within `tol`. A source adapter's `modules_to_save` (e.g. a trained head) are copied unchanged.

    report = convert_adapter(base, "runs/nola/adapter", "runs/nola-lora", rank=16)
    report = convert_adapter(base, "runs/nola/adapter", "runs/nola-lora", rank="auto", tol=0.01)

`rankwise convert ADAPTER_DIR --for peft --rank R --output OUT` is the command-line form (`--to lora` is the
old spelling). The same command writes the other serving exports of `rankwise.export`: `--for vllm`
(a PEFT LoRA vLLM accepts), `--for gguf` (a LoRA for llama.cpp runtimes) and `--for merged` (a full model).
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.core.io import atomic_write_text, read_config, read_weights

REPORT_NAME = "conversion_report.json"


@dataclass
class LayerReport:
    module: str
    kind: str
    shape: list[int]           # canonical delta shape
    rank: int
    relative_error: float      # ||ΔW - BA||_F / ||ΔW||_F (0 for an all-zero update)


@dataclass
class ConversionReport:
    source_method: str
    rank_mode: str             # "fixed" or "auto"
    tol: float | None
    layers: list[LayerReport] = field(default_factory=list)
    output_max_abs_diff: float = float("nan")    # max |y_lora - y_source| on the sample inputs
    output_relative_diff: float = float("nan")   # ||y_lora - y_source|| / ||y_source||
    adapter_effect_relative_diff: float = float("nan")  # ||y_lora - y_source|| / ||y_source - y_base||
    lora_params: int = 0
    source_params: int = 0
    target: str = "peft"       # which export: peft, vllm, gguf or merged
    file_rank: int | None = None                 # the one rank written to the file (vllm, gguf), if any
    dropped: list[dict[str, str]] = field(default_factory=list)  # {"module": ..., "reason": ...} left out of the file
    notes: list[str] = field(default_factory=list)

    @property
    def max_relative_error(self) -> float:
        return max((layer.relative_error for layer in self.layers), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_relative_error": self.max_relative_error}


def tail_relative_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """errors[r] = relative Frobenius error of the best rank-r approximation, for r = 0 .. len(S)."""
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total == 0:
        return torch.zeros(len(energy) + 1, dtype=torch.float64)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tail[r] = Σ_{i>=r} s_i²
    return (tail / total).clamp_min(0).sqrt()


def choose_rank(singular_values: torch.Tensor, rank: int | str, tol: float | None) -> int:
    """The rank for one layer: fixed (capped at the matrix rank limit) or the smallest within `tol`."""
    limit = len(singular_values)
    if rank != "auto":
        return max(1, min(int(rank), limit))
    errors = tail_relative_errors(singular_values)
    within = torch.nonzero(errors <= tol).flatten()
    return max(1, int(within[0])) if len(within) else limit


def lora_factors(delta: torch.Tensor, rank: int | str, tol: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, relative error) with `B @ A` the best approximation of `delta.flatten(1)` at the chosen rank."""
    matrix = delta.detach().double().flatten(1)  # float64: an exact-rank input converts to float32 round-off
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    r = choose_rank(S, rank, tol)
    root = S[:r].sqrt()
    error = float(tail_relative_errors(S)[r])
    return (U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float(), error


def _output_tensor(out: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def run_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's main output tensor (logits, last hidden state or the plain output) on `inputs`."""
    model.eval()
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return _output_tensor(out).float()


def convert_adapter(
    base_model: nn.Module,
    adapter_dir: str | Path,
    output_dir: str | Path,
    rank: int | str = 8,
    tol: float | None = None,
    sample_inputs: Any = None,
    progress: Callable[[str], None] | None = None,
) -> ConversionReport:
    """Write a PEFT LoRA directory approximating the adapter in `adapter_dir` and return its report.

    `base_model` is the model the adapter was trained on; it is not modified. `rank` is an int or
    "auto" (then `tol`, the per-layer relative Frobenius error, is required). `sample_inputs`
    (a tensor, or a dict of keyword arguments) are used to measure the output difference.
    """
    from rankwise.export.common import check_rank, factorize, load_source, measure

    check_rank(rank, tol)
    source_config, source = load_source(base_model, adapter_dir, "exported as LoRA")
    report = ConversionReport(source_config.method_name, "auto" if rank == "auto" else "fixed", tol)
    factors, report.layers = factorize(source, rank, tol, progress)
    lora = _lora_model(base_model, source, factors)
    lora.save_adapter(output_dir)
    report.lora_params = sum(p.numel() for _, layer in lora.adapted_layers() for p in layer.adapters["default"].parameters())
    report.source_params = sum(v.numel() for v in read_weights(adapter_dir).values())
    measure(report, source, lora, base_model, sample_inputs)
    atomic_write_text(Path(output_dir) / REPORT_NAME, json.dumps(report.to_dict(), indent=2))
    return report


def _lora_model(base_model: nn.Module, source, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], keep_saved: bool = True):
    """A rankwise LoRA model on a copy of the base holding `factors` (scaling 1) and (optionally) the source's saved modules."""
    import rankwise

    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    # Exact-name patterns: `(.*\.)?(name)$` only matches this module.
    pattern = {re.escape(name): r for name, r in ranks.items() if r != common}
    config = rankwise.LoraConfig(
        r=common, lora_alpha=common, target_modules=sorted(factors), rank_pattern=pattern, alpha_pattern=dict(pattern),
        modules_to_save=source.configs["default"].modules_to_save if keep_saved else None,
    )
    lora = rankwise.adapt(copy.deepcopy(base_model), config)
    lora_layers = dict(lora.adapted_layers())
    with torch.no_grad():
        for name, (B, A) in factors.items():
            adapter = lora_layers[name].adapters["default"]
            if not math.isclose(adapter.scaling, 1.0):
                raise AssertionError(f"{name}: LoRA scaling {adapter.scaling} != 1")  # a bug here, not user input
            adapter.lora_A.copy_(A.view_as(adapter.lora_A))
            adapter.lora_B.copy_(B.view_as(adapter.lora_B))
        saved = dict(lora.saved_modules())
        for name, module in source.saved_modules() if keep_saved else ():
            saved[name].modules_to_save["default"].load_state_dict(module.modules_to_save["default"].state_dict())
    return lora.eval()


# ---- command line -------------------------------------------------------------------------------

TARGETS = ("peft", "vllm", "gguf", "merged")  # `lora` is accepted as the old name of `peft`


def load_base_for_adapter(adapter_dir: str | Path, model_path: str | Path | None, device: str = "cpu"):
    """(model, tokenizer or None) the adapter directory fits, from a local model dir (default: the embedded MiniLM).

    A causal LM directory (config `architectures` ending in ForCausalLM) is loaded as one; a file that saved
    a classifier head is loaded as a sequence classifier with that many labels; otherwise as the bare model.
    The first candidate the adapter loads onto wins. A directory without a tokenizer gives None.
    Causal LMs and classifiers load through the shared `rankwise.data.models.load_base` (float32, on `device`);
    the bare-encoder fallback is a plain `AutoModel`, which `load_base` does not build.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from rankwise.core.errors import RankwiseError
    from rankwise.core.io import load_adapter
    from rankwise.data.models import default_model_path, load_base, load_classifier, resolve_device

    torch_device = resolve_device(device)

    path = Path(model_path) if model_path is not None else default_model_path()
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model {str(path)!r} is not a transformers model directory (no config.json)")
    weights = read_weights(adapter_dir)
    head = [k for k in weights if re.search(r"\.(classifier|score)(\.out_proj)?\.weight$", k)]
    num_labels = int(weights[head[0]].shape[0]) if head else 2
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    # float32: exports measure the adapter's update, not a bf16 checkpoint's rounding (a merge into bf16
    # weights can lose an update below bf16's resolution; `--for merged --dtype` chooses the stored type).
    candidates = [lambda: load_classifier(path, num_labels, device=device, with_tokenizer=False)[0],
                  lambda: AutoModel.from_pretrained(path, dtype=torch.float32).to(torch_device)]
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        candidates.insert(0, lambda: load_base(path, task="causal-lm", device=device, with_tokenizer=False)[0])
    for load in candidates:
        model = load().eval()
        try:
            load_adapter(model, adapter_dir).unload()
        except RankwiseError:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        return model, tokenizer
    raise ConfigError(
        f"the adapter in {adapter_dir} does not fit the model at {path} (module names or shapes differ). "
        "Pass --model with the model it was trained on."
    )


def sample_token_inputs(model, tokenizer, count: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample sentences for `model`: the embedded tweets if installed (and a tokenizer is known), else random token ids."""
    max_length = min(64, getattr(model.config, "max_position_embeddings", 64))
    try:
        if tokenizer is None:
            raise ConfigError("no tokenizer")
        from rankwise.data.text import load_text_classification

        texts = load_text_classification(None, train_size=1, test_size=count, seed=seed).test_texts
    except ConfigError:
        ids = torch.randint(5, model.config.vocab_size, (count, max_length // 2), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding only needs some id
        tokenizer = copy.copy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def default_output(adapter_dir: Path, target: str) -> Path:
    if target == "gguf":
        return adapter_dir.with_name(adapter_dir.name + ".gguf")
    return adapter_dir.with_name(f"{adapter_dir.name}-{'lora' if target == 'peft' else target}")


MERGED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_export(target: str, adapter_dir: Path, output: Path, model_path: Path | None, rank: int | str | None,
               tol: float | None, progress: Callable[[str], None] | None = None, dtype: str | None = None,
               device: str = "cpu") -> ConversionReport:
    """One export by name (`peft`/`lora`, `vllm`, `gguf`, `merged`), the base loaded (float32) from `model_path`.

    device: where the base runs (its SVDs and the output measurement): auto | cpu | cuda; the files are written
            from CPU copies.
    """
    import warnings

    from rankwise.export import export_gguf_lora, export_merged, export_vllm_lora
    from rankwise.export.common import default_rank

    target = "peft" if target == "lora" else target
    if target not in TARGETS:
        raise ConfigError(f"--for {target!r} is not an export: choose one of {', '.join(TARGETS)} ('lora' = 'peft')")
    if target == "merged" and (rank is not None or tol is not None):
        raise ConfigError("--rank/--tol do not apply to --for merged (a merge is exact); drop them")
    if dtype is not None and (target != "merged" or dtype not in MERGED_DTYPES):
        raise ConfigError(f"--dtype {dtype!r}: only --for merged takes a dtype, one of {', '.join(MERGED_DTYPES)}")
    from rankwise.data.models import resolve_device
    from rankwise.train.tasks import to_device

    torch_device = resolve_device(device)
    base, tokenizer = load_base_for_adapter(adapter_dir, model_path, device)
    inputs = to_device(sample_token_inputs(base, tokenizer), torch_device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what is left out is in the report, printed below
        if target == "merged":
            return export_merged(base, adapter_dir, output, tokenizer=tokenizer, sample_inputs=inputs,
                                 dtype=MERGED_DTYPES[dtype or "float32"])
        if target == "vllm":
            return export_vllm_lora(base, adapter_dir, output, rank, tol, inputs,
                                    base_model_name_or_path=str(model_path) if model_path else None, progress=progress)
        if target == "gguf":
            return export_gguf_lora(base, adapter_dir, output, rank, tol, inputs, progress=progress)
    rank = default_rank(read_config(adapter_dir)) if rank is None else rank
    return convert_adapter(base, adapter_dir, output, rank, tol, inputs, progress=progress)


def register(app) -> None:
    import typer
    from rich.console import Console
    from rich.table import Table

    console = Console()

    @app.command("convert")
    def convert(
        adapter_dir: Path = typer.Argument(..., help="A saved rankwise adapter directory (any method)."),
        target: str = typer.Option("peft", "--for", "--to", help="Export: peft (alias lora), vllm, gguf or merged."),
        rank: Optional[str] = typer.Option(None, help="LoRA rank per layer (default: the adapter's own), or 'auto' (within --tol)."),
        tol: Optional[float] = typer.Option(None, help="With --rank auto: per-layer relative Frobenius error, e.g. 0.01."),
        model: Optional[Path] = typer.Option(None, help="Base model dir the adapter was trained on (default: embedded MiniLM)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", "--out", help="Output (default: ADAPTER_DIR-lora, -vllm, -merged, ADAPTER_DIR.gguf)."),
        dtype: Optional[str] = typer.Option(None, help="--for merged: stored weight type, float32 (default), bfloat16 or float16."),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda: where the base runs."),
    ) -> None:
        """Export any adapter for serving: PEFT LoRA, vLLM LoRA, GGUF LoRA (llama.cpp) or a merged model; report errors."""
        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError

        name = "peft" if target == "lora" else target
        out = output or default_output(adapter_dir, name)
        try:
            rank_value: int | str | None = None if rank is None else "auto" if rank == "auto" else _int_rank(rank)
            with console.status("[bold]exporting...") as status:
                report = run_export(name, adapter_dir, out, model, rank_value, tol,
                                    progress=lambda layer: status.update(f"[bold]SVD of {layer}"), dtype=dtype,
                                    device=device)
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(2) from None
        _print_report(console, Table, report, tol, out)


def _print_report(console, Table, report: ConversionReport, tol, out: Path) -> None:
    mode = "merged" if report.target == "merged" else f"{report.rank_mode} rank{'' if tol is None else f', tol {tol}'}"
    table = Table(title=f"{report.source_method} -> {report.target} ({mode})")
    for col in ("layer", "kind", "shape", "rank", "relative error"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer in report.layers:
        table.add_row(layer.module, layer.kind, "x".join(map(str, layer.shape)), str(layer.rank), f"{layer.relative_error:.2e}")
    console.print(table)
    for item in report.dropped:
        console.print(f"[yellow]left out[/yellow] {item['module']}: {item['reason']}")
    for note in report.notes:
        console.print(f"note: {note}")
    rank = "" if report.file_rank is None else f"File rank {report.file_rank}. "
    console.print(
        f"output difference on sample inputs: max |Δy| {report.output_max_abs_diff:.3e}, "
        f"relative {report.output_relative_diff:.3e} ({report.adapter_effect_relative_diff:.2%} of the adapter's effect). "
        f"{rank}Exported parameters {report.lora_params:,} (source file {report.source_params:,}). Written to {out}"
    )


def _int_rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"--rank {text!r} is invalid: expected an integer >= 1 or 'auto'") from None
    if value < 1:
        raise ConfigError(f"--rank {value} is invalid: expected an integer >= 1 or 'auto'")
    return value
