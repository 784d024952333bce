"""`rankwise compress MODEL --method NAME --ratio 0.5 --calibration DATA --out DIR`.

Thin: load the model and data, validate everything, call the compressor, measure, save, print.
Nothing is written unless compression and measurement succeeded.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

import typer

from rankwise.core.console import print_error
from rankwise.core.errors import ConfigError, RankwiseError, ShapeError

MODEL_ALIASES = ("smollm2", "minilm")
TEXT_ALIASES = ("kjv", "lee", "auto")


def _parse_options(options: list[str]) -> dict[str, Any]:
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--option {item!r} is invalid: expected KEY=VALUE (VALUE as JSON, e.g. steps=20)")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def load_model_and_tokenizer(model_ref: str, device: str = "cpu"):
    """A transformers model (float32, eval, on `device`) and its tokenizer from a directory or an offline alias.

    Causal LMs load through the shared `rankwise.data.models.load_base`. Encoders stay a bare `AutoModel` (no
    classification head: compression is judged on the sentence embeddings), which `load_base` does not build.
    The tokenizer is optional here (pre-tokenised .safetensors calibration needs none), so it is loaded apart.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from rankwise.data import offline_assets
    from rankwise.data.models import load_base, resolve_device

    torch_device = resolve_device(device)
    path = {"smollm2": offline_assets.smollm2_dir, "minilm": offline_assets.minilm_dir}.get(model_ref)
    path = Path(path() if path else model_ref)
    if not (path / "config.json").exists():
        raise ConfigError(f"MODEL={model_ref!r} is not a model directory with config.json: pass a Hugging Face "
                          f"directory or one of {', '.join(MODEL_ALIASES)}")
    from rankwise.compress.serialize import is_compressed_dir

    if is_compressed_dir(path):
        raise ConfigError(f"MODEL={model_ref!r} is already a `rankwise compress` output: compress the original model "
                          "(or load this one with rankwise.compress.load_compressed)")
    config = AutoConfig.from_pretrained(str(path))
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    if causal:
        model, _ = load_base(path, task="causal-lm", dtype="float32", device=device, with_tokenizer=False)
    else:
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32).to(torch_device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError):
        tokenizer = None  # fine with pre-tokenised calibration (.safetensors input_ids)
    return model, tokenizer, causal


def batches_to_device(batches: list, device) -> list:
    """Calibration/held-out batches (token-id tensors or tokenizer dicts) moved to the model's device."""
    from rankwise.train.tasks import to_device

    return [to_device(b, device) if isinstance(b, dict) else b.to(device) for b in batches]


def load_calibration_text(data: str) -> str:
    from rankwise.data.offline_assets import real_text

    if data in TEXT_ALIASES:
        return real_text(data)
    path = Path(data)
    if not path.exists():
        raise ConfigError(f"--calibration {data!r}: no such file; pass a .txt file, a .safetensors file with "
                          f"'input_ids', or one of {', '.join(TEXT_ALIASES)}")
    return path.read_text(encoding="utf-8", errors="replace")


def build_batches(data: str, tokenizer, causal: bool, samples: int, eval_samples: int, seq_len: int):
    """Calibration and held-out batches: token chunks for causal LMs, sentences for encoders."""
    import torch
    from safetensors.torch import load_file

    from rankwise.compress.evaluate import split_calibration_eval, token_chunks

    if data.endswith(".safetensors"):
        tensors = load_file(data)
        if "input_ids" not in tensors:
            raise ShapeError(f"{data} has no 'input_ids' tensor (found {sorted(tensors)})")
        ids = tensors["input_ids"]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"{data}: input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}; expected "
                             "integer token ids [n_sequences, seq_len]")
        n_eval = min(eval_samples, max(1, ids.shape[0] // 4))
        return split_calibration_eval(ids.long(), min(samples, ids.shape[0] - n_eval), n_eval, 8)
    if tokenizer is None:
        raise ConfigError("the model directory has no tokenizer: pass --calibration as a .safetensors file of input_ids")
    text = load_calibration_text(data)
    if causal:
        chunks = token_chunks(tokenizer, text, seq_len, max_tokens=(samples + eval_samples) * seq_len * 40)
        # take held-out rows from the far end of the loaded text, away from the calibration rows
        return split_calibration_eval(chunks, samples, eval_samples, 8)
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) >= 5]
    if len(sentences) < samples + eval_samples:
        raise ShapeError(f"--calibration has {len(sentences)} sentences, need {samples + eval_samples}")

    def encode(group):
        return [dict(tokenizer(group[i:i + 16], padding=True, truncation=True, max_length=seq_len,
                               return_tensors="pt")) for i in range(0, len(group), 16)]

    return encode(sentences[:samples]), encode(sentences[-eval_samples:])


def quality(model, reference_embeddings, held_out, causal: bool) -> dict[str, float]:
    from rankwise.compress.evaluate import embedding_cosine, mean_pooled_embeddings, perplexity

    if causal:
        return {"perplexity": perplexity(model, held_out)}
    return {"embedding_cosine_to_original": embedding_cosine(reference_embeddings,
                                                              mean_pooled_embeddings(model, held_out))}


def compress_command(
    model: str = typer.Argument(..., help="Hugging Face model directory, or an offline alias: smollm2, minilm"),
    method: str = typer.Option(..., "--method", "-m", help="svd, svd-llm, asvd, lord, modegpt, afm, pela, loram"),
    ratio: float = typer.Option(0.5, "--ratio", help="fraction of the compressed layers' parameters to keep, in (0, 1]"),
    calibration: str = typer.Option("auto", "--calibration", "-c",
                                    help="text file, .safetensors with input_ids, or kjv / lee / auto"),
    out: Path = typer.Option(Path("compressed"), "--output", "-o", "--out", help="output directory (--out: deprecated alias)"),
    samples: int = typer.Option(32, help="calibration sequences"),
    eval_samples: int = typer.Option(16, help="held-out sequences for the quality measurement"),
    seq_len: int = typer.Option(128, help="tokens per sequence"),
    target: Optional[list[str]] = typer.Option(None, "--target", help="regex of layers to compress (repeatable)"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="method option KEY=VALUE (repeatable)"),
    device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda: where the model and batches run"),
    save_dense: bool = typer.Option(False, "--save-dense",
                                    help="multiply compressed layers back into dense ones: a plain transformers "
                                         "directory, same outputs, but no size gain"),
) -> None:
    """Compress MODEL into low-rank/smaller layers and write a loadable model plus report.json."""
    from rich.console import Console
    from rich.table import Table

    from rankwise.compress import get_method, save_compressed
    from rankwise.compress._common import check_calibration
    from rankwise.compress.evaluate import cpu_latency_ms, mean_pooled_embeddings
    from rankwise.data.models import resolve_device

    console = Console(stderr=True)
    try:
        torch_device = resolve_device(device)  # before anything loads: a bad --device fails at once
        config_cls, run = get_method(method)
        fields = {"ratio": ratio, **_parse_options(option or [])}
        if target:
            fields["target_modules"] = list(target)
        try:
            config = config_cls(**fields)
        except TypeError as exc:
            raise ConfigError(f"bad --option for {method}: {exc}") from exc
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"--out {out} exists and is not empty: choose a new directory")
        with console.status(f"loading {model}"):
            net, tokenizer, causal = load_model_and_tokenizer(model, device)
        cal, held_out = build_batches(calibration, tokenizer, causal, samples, eval_samples, seq_len)
        cal, held_out = batches_to_device(cal, torch_device), batches_to_device(held_out, torch_device)
        check_calibration(net, cal)
        reference = None if causal else mean_pooled_embeddings(net, held_out)
        original = None if causal else copy.deepcopy(net)
        before = quality(net, reference, held_out, causal)
        latency_before = cpu_latency_ms(net, held_out[0], repeats=3)
        net, report = run(net, config, cal)
        after = quality(net, reference, held_out, causal)
        if original is not None:
            before = quality(original, reference, held_out, causal)
        report.quality = {"before": before, "after": after, "held_out_sequences": eval_samples,
                          "calibration": calibration}
        report.latency_ms = {"before": latency_before, "after": cpu_latency_ms(net, held_out[0], repeats=3)}
        report.file_size_bytes = save_compressed(net.cpu(), out, config.to_dict(), method, dense=save_dense)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    except RankwiseError as exc:
        print_error(exc, console)
        raise typer.Exit(2)
    except (ValueError, OSError) as exc:
        print_error(exc, console)
        raise typer.Exit(2)
    table = Table(title=f"rankwise compress: {method} at ratio {ratio}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("parameters (compressed layers)", f"{report.compressed_params_before:,}",
                  f"{report.compressed_params_after:,}")
    table.add_row("parameters (model)", f"{report.params_before:,}", f"{report.params_after:,}")
    for key in after:
        table.add_row(key, f"{before[key]:.4g}", f"{after[key]:.4g}")
    for stage in ("finetune", "align"):  # AFM's fine-tuning, LoRAM's alignment: training loss before/after
        if isinstance(report.extra.get(stage), dict):
            info = report.extra[stage]
            table.add_row(f"{stage} loss ({info['steps']} steps)", f"{info['loss_before']:.4g}", f"{info['loss_after']:.4g}")
    table.add_row("CPU latency (ms/batch)", f"{report.latency_ms['before']:.1f}", f"{report.latency_ms['after']:.1f}")
    table.add_row("file size (MB)", "", f"{report.file_size_bytes / 1e6:.1f}")
    Console().print(table)
    from rankwise.compress.serialize import read_structure

    files = ", ".join(sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")))
    if read_structure(out).get("layout") == "transformers":
        Console().print(f"wrote {out}/ ({files}): a transformers directory, "
                        f"AutoModel*.from_pretrained({str(out)!r}) loads it")
    else:
        Console().print(f"wrote {out}/ ({files}): load it with rankwise.compress.load_compressed({str(out)!r}) "
                        "(plain transformers refuses it; --save-dense writes a transformers directory)")


def register(app: typer.Typer) -> None:
    app.command("compress")(compress_command)
