"""Train-step time and peak memory: rankwise LoRA vs PEFT LoRA vs full fine-tuning vs the frozen floor.

Model: a MiniLM-size BERT encoder (hidden 384, 6 layers, FFN 1536; all-MiniLM-L6-v2's shapes, built from
its config so no download is needed), batch 16 x 128 tokens, 2 threads. LoRA r=8 on query, key, value, dense.
The floor is the frozen model with gradients flowing through every layer (inputs_embeds requires grad):
every millisecond above it is adapter overhead.

    python bench/bench_lora.py            # prints a table, writes bench/results/lora_step.json
"""
from __future__ import annotations

import copy
import sys

import torch

_HERE = __import__("pathlib").Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # run from a checkout without installing
from common import interleaved_medians, machine, peak_rss_in_subprocess, peak_rss_mib, write_json  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
BATCH, SEQ, RANK = 16, 128, 8
CONTENDERS = ("floor", "rankwise_lora", "peft_lora", "full_finetune")
# RandLoRA (issue 3) at PEFT's defaults (r=32, alpha=640) on the same targets: `--contenders` adds them.
RANDLORA = ("rankwise_randlora", "peft_randlora")
# The floor plus the weight gradient (g^T x) of every targeted layer, no optimizer: what any method whose
# update is full rank (RandLoRA: rN >= min(out, in)) must add to the floor when its gradients are exact.
BOUND = "full_rank_bound"
PAIRS = (("rankwise_lora", "peft_lora"), ("rankwise_randlora", "peft_randlora"))


def build_base():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                     max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def make_step(name: str, base):
    """A closure doing one training step of contender `name` and the number of trainable parameters."""
    model = copy.deepcopy(base)
    ids = torch.randint(0, 30522, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    if name == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
    elif name == "full_finetune":
        params = list(model.parameters())
    elif name == BOUND:
        for module_name, module in model.named_modules():
            targeted = isinstance(module, torch.nn.Linear) and module_name.split(".")[-1] in TARGETS
            for p in module.parameters(recurse=False):
                p.requires_grad_(targeted and p is module.weight)
        params = []
    elif name == "rankwise_lora":
        import rankwise

        model = rankwise.adapt(model, rankwise.LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    elif name == "peft_lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    elif name == "rankwise_randlora":
        import rankwise

        model = rankwise.adapt(model, rankwise.RandLoraConfig(target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    elif name == "peft_randlora":
        import peft

        model = peft.get_peft_model(model, peft.RandLoraConfig(target_modules=TARGETS))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        raise ValueError(name)
    embeddings = base.get_input_embeddings()
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        # Same input path for everyone; only the floor needs the embedding gradient to force backward through all layers.
        embeds = embeddings(ids).detach().requires_grad_(name in ("floor", BOUND))
        out = model(inputs_embeds=embeds).last_hidden_state
        out.float().pow(2).mean().backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def main() -> None:
    torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", "2")))
    if len(sys.argv) == 4 and sys.argv[1] == "--memory":  # child process: one contender, print peak RSS
        torch.set_flush_denormal(True)
        TARGETS[:] = sys.argv[3].split(",")
        step, _ = make_step(sys.argv[2], build_base())
        for _ in range(2):
            step()
        print(peak_rss_mib())  # VmHWM: ru_maxrss would inherit the parent's peak across fork+exec
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed steps per contender (interleaved)")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=[*CONTENDERS, *RANDLORA, BOUND],
                        help="which rows to run (the floor always runs); add rankwise_randlora peft_randlora for issue 3")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated module names to adapt")
    parser.add_argument("--out", default="lora_step", help="JSON name under bench/results/")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormals (rankwise's loop flushes them; see TrainConfig.flush_denormals)")
    args = parser.parse_args()
    # Every contender runs under the same setting, so the ratios measure adapter overhead only.
    torch.set_flush_denormal(not args.keep_denormals)
    TARGETS[:] = args.targets.split(",")
    contenders = ["floor", *[name for name in args.contenders if name != "floor"]]
    base = build_base()
    steps, trainable = {}, {}
    for name in contenders:
        steps[name], trainable[name] = make_step(name, base)
    timing = interleaved_medians(steps, warmup=2, rounds=args.rounds)
    memory = {name: peak_rss_in_subprocess(__file__, "--memory", name, args.targets) for name in contenders}
    floor = timing["floor"]["median_s"]
    rows = {
        name: {
            "step_ms": 1000 * timing[name]["median_s"],
            "ratio_to_floor": timing[name]["median_s"] / floor,
            "cpu_ms": 1000 * timing[name]["cpu_median_s"],
            "cpu_ratio_to_floor": timing[name]["cpu_median_s"] / timing["floor"]["cpu_median_s"],
            "peak_rss_mb": memory[name],
            "trainable_params": trainable[name],
        }
        for name in contenders
    }
    for ours, peer in PAIRS:
        if ours in rows and peer in rows:
            rows[ours]["ratio_to_peft"] = timing[ours]["median_s"] / timing[peer]["median_s"]
            rows[ours]["cpu_ratio_to_peft"] = timing[ours]["cpu_median_s"] / timing[peer]["cpu_median_s"]
    payload = {"benchmark": "lora_train_step", "batch": BATCH, "seq": SEQ, "rank": RANK, "targets": TARGETS,
               "flush_denormals": not args.keep_denormals,
               "machine": machine(), "results": rows}
    path = write_json(args.out, payload)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"train step, MiniLM-size encoder, B={BATCH} T={SEQ}, on {','.join(TARGETS)} (LoRA r={RANK}; RandLoRA PEFT defaults)")
    for col in ("contender", "step ms", "x floor", "CPU ms", "CPU x floor", "peak RSS MB", "trainable"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['step_ms']:.0f}", f"{r['ratio_to_floor']:.3f}", f"{r['cpu_ms']:.0f}", f"{r['cpu_ratio_to_floor']:.3f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['trainable_params']:,}")
    Console().print(table)
    for ours, _ in PAIRS:
        if "ratio_to_peft" in rows.get(ours, {}):
            print(f"{ours}/PEFT step-time ratio: wall {rows[ours]['ratio_to_peft']:.3f}, CPU {rows[ours]['cpu_ratio_to_peft']:.3f}")
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
