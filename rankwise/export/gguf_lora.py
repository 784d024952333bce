"""A LoRA in GGUF for llama.cpp-style runtimes (llama.cpp, llama-cpp-python, Ollama), written with `gguf`.

llama.cpp's LoRA file conventions (its `llama-adapter.cpp` loader and `convert_lora_to_gguf.py`):
- metadata `general.type = "adapter"`, `general.architecture` equal to the base GGUF's (`llama`),
  `adapter.type = "lora"`, `adapter.lora.alpha`; each pair scales by alpha / rank(pair) (alpha 0: scale 1).
- one pair per base tensor, named after the base GGUF tensor: `blk.N.attn_q.weight.lora_a` / `.lora_b`.
  A numpy array of shape (rows, cols) is a ggml tensor with ne = [cols, rows], so for a linear W (out x in):

      lora_a  numpy (r x in)    ne [in, r]      == PEFT lora_A
      lora_b  numpy (out x r)   ne [r, out]     == PEFT lora_B
      token_embd (vocab x dim in HF): lora_a numpy (vocab x r) = Aᵀ, lora_b numpy (dim x r) = B

- the HF -> GGUF converter reorders the rows of LLaMA's q_proj and k_proj (per head, the two rotary
  halves are interleaved: rows [h, 2, d/2] -> [h, d/2, 2]; k uses the key/value head count), so the base
  GGUF's attn_q / attn_k are row-permuted. A LoRA update ΔW = B A on those tensors must be permuted the
  same way, which only touches B's rows.

Every layer goes through the SVD conversion (`rankwise.convert.lora_factors`, scaling 1); pairs are
zero-padded to one rank r and alpha = r, so every runtime scales by exactly 1. When the input embedding
and the head are tied (SmolLM2), llama.cpp reads the head from `token_embd`, so a LoRA on either would
change both: those layers are left out (listed in the report), as are `modules_to_save`.

    report = export_gguf_lora(base, "runs/lora/adapter", "runs/lora.gguf")
    # llama_cpp.Llama(model_path="SmolLM2-135M-Instruct.Q4_1.gguf", lora_path="runs/lora.gguf")
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.export.common import (
    check_rank,
    default_rank,
    factorize,
    load_source,
    measure,
    module_touches,
    pad_rank,
    tied_embedding_names,
)

# transformers model_type -> (gguf architecture, whether the HF->GGUF converter permutes q/k rows)
ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True)}


def rotary_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's HF->GGUF reordering of q/k rows: per head, rows [2, d/2] become [d/2, 2]."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_lora_tensors(base_model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], kinds: dict[str, str]):
    """({gguf tensor name: numpy array}, {module: reason} for layers with no GGUF tensor) for `factors`."""
    import gguf

    config = base_model.config
    arch_name, permutes = _architecture(config)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tensors, unmapped = {}, {}
    for module, (B, A) in factors.items():
        base_name = name_map.get_name(module)
        if base_name is None:
            unmapped[module] = f"no {arch_name.lower()} GGUF tensor corresponds to it"
            continue
        if permutes and module.endswith("q_proj"):
            B = rotary_permute(B, n_head)
        elif permutes and module.endswith("k_proj"):
            B = rotary_permute(B, n_kv)
        if kinds[module] == "embedding":
            lora_a, lora_b = A.T, B  # llama.cpp gathers rows of lora_a per token (llm_build_inp_embd)
        else:
            lora_a, lora_b = A, B
        tensors[f"{base_name}.weight.lora_a"] = lora_a.float().cpu().contiguous().numpy()
        tensors[f"{base_name}.weight.lora_b"] = lora_b.float().cpu().contiguous().numpy()
    return tensors, unmapped


def export_gguf_lora(
    base_model: nn.Module,
    adapter_dir: str | Path,
    output_path: str | Path,
    rank: int | str | None = None,
    tol: float | None = None,
    sample_inputs: Any = None,
    progress: Callable[[str], None] | None = None,
):
    """Write a GGUF LoRA file for the adapter in `adapter_dir` (base: a transformers LLaMA-family model).

    `rank` is per layer (default: the source's rank), or "auto" with `tol`. The file is read back with
    `gguf.GGUFReader` and compared to the factors written; the report goes to `<output>.report.json`.
    """
    import gguf

    from rankwise.convert import ConversionReport, _lora_model
    from rankwise.core.io import atomic_write, atomic_write_text, read_weights

    _architecture(getattr(base_model, "config", None))
    config, source = load_source(base_model, adapter_dir, "exported as a GGUF LoRA")
    rank = default_rank(config) if rank is None else rank
    check_rank(rank, tol)
    report = ConversionReport(config.method_name, "auto" if rank == "auto" else "fixed", tol, target="gguf")
    factors, report.layers = factorize(source, rank, tol, progress)
    layers = dict(source.adapted_layers())
    kinds = {name: layers[name].kind for name in factors}
    tied = tied_embedding_names(base_model)
    kept = {}
    for name, pair in factors.items():
        if kinds[name] not in ("linear", "embedding"):
            report.dropped.append({"module": name, "reason": f"a {kinds[name]} layer: llama.cpp LoRA covers linear and embedding"})
        elif module_touches(name, tied):
            report.dropped.append({"module": name, "reason": (
                "tied input embedding and output head: llama.cpp reads the head from token_embd, so a LoRA on it would "
                "change both (export --for merged instead)")})
        else:
            kept[name] = pair
    for name, _ in source.saved_modules():
        report.dropped.append({"module": name, "reason": "modules_to_save (a full trained copy): a LoRA file cannot hold it"})
    tensors, unmapped = gguf_lora_tensors(base_model, kept, kinds)
    for name, reason in unmapped.items():
        report.dropped.append({"module": name, "reason": reason})
        kept.pop(name)
    if not kept:
        raise ConfigError(f"nothing to export as a GGUF LoRA: every changed layer was left out ({report.dropped})")
    if report.dropped:
        warnings.warn("left out of the GGUF LoRA: " + "; ".join(f"{d['module']} ({d['reason']})" for d in report.dropped), stacklevel=2)
    # One rank for every pair, so alpha / rank == 1 for each (llama.cpp reads the rank from each lora_b).
    r_file = max(B.shape[1] for B, _ in kept.values())
    report.file_rank = r_file
    kept = {name: pad_rank(B, A, r_file) for name, (B, A) in kept.items()}
    tensors, _ = gguf_lora_tensors(base_model, kept, kinds)
    report.lora_params = sum(t.size for t in tensors.values())
    report.source_params = sum(v.numel() for v in read_weights(adapter_dir).values())
    measure(report, source, _lora_model(base_model, source, kept, keep_saved=False), base_model, sample_inputs)

    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, _architecture(base_model.config)[0])]

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r_file))
        writer.add_string("general.name", f"rankwise {config.method_name} adapter")
        for name, array in tensors.items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        readback = {t.name: t.data for t in gguf.GGUFReader(path).tensors}
        worst = max(float(abs(readback[name].reshape(array.shape) - array).max()) for name, array in tensors.items())
        if set(readback) != set(tensors) or worst > 0:
            raise AssertionError(f"GGUF read-back differs from what was written (max {worst})")  # a bug, not input

    output_path = Path(output_path)
    if output_path.is_dir():
        raise ConfigError(f"--output {output_path} is a directory: a GGUF LoRA is one file, e.g. {output_path / 'adapter.gguf'}")
    atomic_write(output_path, write)
    report.notes.append(f"{len(tensors) // 2} lora_a/lora_b pairs at rank {r_file}, alpha {r_file}; read back identical")
    atomic_write_text(report_path(output_path), json.dumps(report.to_dict(), indent=2))
    return report


def report_path(output_path: Path) -> Path:
    return output_path.with_name(output_path.name + ".report.json")


def _architecture(config) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF LoRA export supports the {sorted(ARCHITECTURES)} model types (llama.cpp's 'llama' architecture); "
            f"the base model is {model_type!r}. Export --for merged or --for peft instead"
        )
    return ARCHITECTURES[model_type]
