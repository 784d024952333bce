"""Every registered adapter method and every training procedure through the causal-LM finetune recipe on the tiny
LLaMA (GQA, RoPE, tied embeddings, a real tokenizer with a chat template): a few steps, perplexity reported, and
the saved adapter reloads onto a fresh base with the same held-out loss the run reported."""
from __future__ import annotations

import json
import math

import pytest
import torch

import rankwise
from test_llm import sentiment_rows
from test_matrix import SMALL_KWARGS
from llama_cases import PROCEDURE_CASES

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # k/v are GQA's non-square (32 -> 16) projections
# Input-side / embedding-only methods: what they adapt and hyper-parameters that fit the tiny model.
EMBEDDING_ONLY = {"dept": {"num_virtual_tokens": 2, "r": 2, "max_length": 128}}


def _task():
    from rankwise.data.instructions import InstructionData
    from rankwise.train.tasks.causal_lm import CausalLMTask

    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
             for r in sentiment_rows(24)]
    return CausalLMTask(InstructionData(convs[:16], convs[16:], "toy"), eval_generations=2, max_new_tokens=4)


def _run(tiny_llama_dir, out, **spec_kwargs):
    from rankwise.train.finetune import FinetuneSpec, finetune
    from rankwise.train.loop import TrainConfig

    task = _task()
    spec = FinetuneSpec(**{"rank": None, "max_length": 64, "batch_size": 4, "device": "cpu",
                           "train": TrainConfig(max_steps=3, lr=1e-2, warmup_ratio=0.0), **spec_kwargs})
    metrics = finetune(task, spec, out, model_path=tiny_llama_dir, progress=False)
    return task, metrics


def _fresh_base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _check_metrics(metrics):
    for when in ("before", "after"):
        assert math.isfinite(metrics[when]["perplexity"]) and metrics[when]["perplexity"] > 1
        assert metrics[when]["perplexity"] == pytest.approx(math.exp(metrics[when]["loss"]), rel=1e-6)
        assert "exact_match" in metrics[when]
    assert metrics["optimizer_steps"] == 3


def _method_spec(info):
    if info.name in EMBEDDING_ONLY:
        return {"method": info.name, "targets": ["embed_tokens"], "method_options": EMBEDDING_ONLY[info.name]}
    assert "linear" in info.config_cls.supported_layers, f"{info.name}: give it a case here"
    return {"method": info.name, "targets": LINEAR_TARGETS, "method_options": SMALL_KWARGS.get(info.name, {})}


@pytest.mark.slow
@pytest.mark.parametrize("info", rankwise.list_methods(), ids=lambda i: i.name)
def test_every_method_finetunes_the_llm_and_reloads(info, tiny_llama_dir, tmp_path):
    task, metrics = _run(tiny_llama_dir, tmp_path / "run", **_method_spec(info))
    _check_metrics(metrics)
    assert metrics["method"] == info.name and metrics["trainable"]["trainable"] > 0
    loaded = rankwise.load_adapter(_fresh_base(tiny_llama_dir), tmp_path / "run" / "adapter")
    reloaded = task.held_out_loss(loaded)
    assert reloaded["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROCEDURE_CASES))
def test_every_procedure_finetunes_the_llm_and_reloads(name, tiny_llama_dir, tmp_path):
    make_config, options, lr = PROCEDURE_CASES[name]
    spec = {"procedure": name, "procedure_options": options, "targets": LINEAR_TARGETS}
    if make_config is not None:  # the procedure's LoRA, as the llama procedure test builds it
        config = make_config()
        spec.update(method="lora", rank=config.r,
                    method_options={"lora_alpha": config.lora_alpha, "lora_dropout": 0.0,
                                    "init_lora_weights": config.init_lora_weights})
    task, metrics = _run(tiny_llama_dir, tmp_path / "run", **spec)
    _check_metrics(metrics)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["procedure"]["procedure"]
    if make_config is None:  # TRP: a dense low-rank model, not an adapter
        from rankwise.train.trp import load_low_rank

        loaded = load_low_rank(_fresh_base(tiny_llama_dir), tmp_path / "run" / "low_rank")
    else:
        loaded = rankwise.load_adapter(_fresh_base(tiny_llama_dir), tmp_path / "run" / "adapter")
    assert task.held_out_loss(loaded)["loss"] == pytest.approx(metrics["after"]["loss"], rel=1e-5, abs=1e-6)
