"""Serving exports (`rankwise convert --for merged|vllm|gguf`) on a tiny LLaMA: GQA, RoPE, tied embeddings.

The merged directory is loaded by plain transformers, the vLLM LoRA by PEFT, the GGUF LoRA is read back
with `gguf.GGUFReader` tensor by tensor and compared with factors recomputed here (the q/k row order by
an index formula, not the export's own function). `test_gguf_lora_in_llama_cpp` runs the file in a real
llama.cpp runtime only when `llama_cpp` imports (`pip install llama-cpp-python==0.3.36`, built as in
docs/convert.md); it is skipped otherwise, and the same check with the real SmolLM2 is
`bench/gguf_lora_runtime.py`.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_cli import runner
from test_matrix import INPUT_SIDE_METHODS, SMALL_KWARGS, perturb

import rankwise
from rankwise.cli import app
from rankwise.convert import REPORT_NAME, run_model
from rankwise.core.errors import ConfigError
from rankwise.export import (
    VLLM_RANKS,
    export_gguf_lora,
    export_merged,
    export_vllm_lora,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
gguf = pytest.importorskip("gguf", reason="gguf is a test dependency: pip install -e '.[test]'")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_HEAD, N_KV, HEAD_DIM = 4, 2, 8


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=N_HEAD * HEAD_DIM, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA saved like a hub model: config, weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", eos_token="w1", pad_token="w2")
    tokenizer.save_pretrained(path)
    return path


def inputs():
    return {"input_ids": torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(5))}


def saved_adapter(path, config, scale=0.5):
    """(pristine base, adapted model) with a non-trivial adapter saved in `path`."""
    base = tiny_llama()
    model = rankwise.adapt(copy.deepcopy(base), config).eval()
    perturb(model, scale=scale)
    with torch.no_grad():  # a trained head copy differs from the base's
        for _, module in model.saved_modules():
            for p in module.modules_to_save["default"].parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    model.save_adapter(path)
    return base, model


def method_config(info, targets):
    return info.config_cls(target_modules=targets, **SMALL_KWARGS.get(info.name, {}))


WEIGHT_METHODS = [info.name for info in rankwise.list_methods() if info.name not in INPUT_SIDE_METHODS]


# ---- merged ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_merged_directory_loads_in_transformers_with_equal_outputs(name, tmp_path):
    info = rankwise.get_method(name)
    base, model = saved_adapter(tmp_path / "src", method_config(info, ["q_proj", "k_proj", "v_proj", "down_proj"]))
    report = export_merged(base, tmp_path / "src", tmp_path / "merged", sample_inputs=inputs())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    y_adapted, y_loaded = run_model(model, inputs()), run_model(loaded, inputs())
    assert float((y_loaded - run_model(base, inputs())).abs().max()) > 1e-3  # the adapter does change the outputs
    assert float((y_loaded - y_adapted).abs().max()) < 1e-5
    assert report.output_max_abs_diff < 1e-5 and report.max_relative_error < 1e-5
    assert json.loads((tmp_path / "merged" / REPORT_NAME).read_text())["target"] == "merged"
    assert not any(p.name.startswith(".merged") for p in tmp_path.iterdir())  # no temp dir left behind


@pytest.mark.parametrize("where", [{"target_modules": ["embed_tokens", "q_proj"]}, {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}])
def test_merged_unties_a_tied_embedding_the_adapter_changes(where, tmp_path):
    base, model = saved_adapter(tmp_path / "src", rankwise.LoraConfig(r=4, init_lora_weights=False, **where))
    report = export_merged(base, tmp_path / "src", tmp_path / "merged", sample_inputs=inputs())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert loaded.config.tie_word_embeddings is False
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert float((run_model(loaded, inputs()) - run_model(model, inputs())).abs().max()) < 1e-5
    assert any("untied" in note for note in report.notes)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # the caller's base is left as it was


def test_merged_in_bf16_reports_the_update_it_loses(tmp_path):
    base, model = saved_adapter(tmp_path / "src", rankwise.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # an update far below bf16's resolution of W (|W| ~ 0.02, bf16 step ~ 1e-4)
        for _, layer in model.adapted_layers():
            layer.adapters["default"].lora_B.normal_(0, 1e-6)
    model.save_adapter(tmp_path / "src")
    exact = export_merged(base, tmp_path / "src", tmp_path / "fp32", sample_inputs=inputs())
    assert exact.max_relative_error < 1e-3 and not any("loses" in n for n in exact.notes)
    rounded = export_merged(base, tmp_path / "src", tmp_path / "bf16", sample_inputs=inputs(), dtype=torch.bfloat16)
    assert rounded.max_relative_error > 0.5 and any("loses up to" in n for n in rounded.notes)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merged_refuses_dept_and_keeps_the_old_output(tmp_path):
    base = tiny_llama()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.get_method("dept").config_cls(target_modules=["embed_tokens"]))
    model.save_adapter(tmp_path / "dept")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConfigError, match="dept adapters cannot be merged"):
        export_merged(base, tmp_path / "dept", out)
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["dept", "merged"]
    for export, target in ((export_vllm_lora, "vllm"), (export_gguf_lora, "a.gguf")):
        with pytest.raises(ConfigError, match="dept adapters cannot be exported"):
            export(base, tmp_path / "dept", tmp_path / target)
        assert not (tmp_path / target).exists()
    # A successful export replaces the whole directory.
    saved_adapter(tmp_path / "lora", rankwise.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    export_merged(base, tmp_path / "lora", out)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_cli_merged_with_tokenizer(llama_dir, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(r=4, target_modules=PROJECTIONS, init_lora_weights=False))
    model.save_adapter(tmp_path / "src")
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "merged", "--model", str(llama_dir), "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert float((run_model(loaded, inputs()) - run_model(model, inputs())).abs().max()) < 1e-5
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "m")("w5 w6")["input_ids"] == [5, 6]
    bad = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "merged", "--rank", "4", "--model", str(llama_dir)])
    assert bad.exit_code == 2 and "do not apply to --for merged" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "vllm", "--dtype", "bfloat16", "--model", str(llama_dir)])
    assert bad.exit_code == 2 and "only --for merged takes a dtype" in bad.output
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "merged", "--dtype", "bfloat16",
                                 "--model", str(llama_dir), "-o", str(tmp_path / "m16")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m16" / "config.json").read_text())["dtype"] == "bfloat16"


# ---- vLLM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WEIGHT_METHODS)
def test_vllm_lora_is_valid_and_peft_loads_it(name, tmp_path):
    info = rankwise.get_method(name)
    targets = ["q_proj", "v_proj", "up_proj"]
    base, model = saved_adapter(tmp_path / "src", method_config(info, targets))
    report = export_vllm_lora(base, tmp_path / "src", tmp_path / "vllm", rank=5, sample_inputs=inputs())
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == report.file_rank == 8 and config["r"] in VLLM_RANKS
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == sorted(targets)
    assert not config["modules_to_save"] and not config["rank_pattern"]
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    assert all(("lora_A" in k or "lora_B" in k) and "embed" not in k and "lm_head" not in k for k in weights)
    assert {t.shape[0] for k, t in weights.items() if "lora_A" in k} == {8}
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "vllm").eval()
    y_peft, y_source = run_model(peft_model, inputs()), run_model(model, inputs())
    assert float((y_peft - y_source).abs().max()) == pytest.approx(report.output_max_abs_diff, rel=1e-3, abs=1e-6)
    # The reported per-layer error is the true one: recomputed from PEFT's own delta weights.
    deltas = model.delta_weights()
    for layer in report.layers:
        peft_layer = peft_model.get_submodule("base_model.model." + layer.module)
        approx = peft_layer.get_delta_weight("default")
        exact = deltas[layer.module]
        true_error = float((approx - exact).norm() / exact.norm()) if exact.norm() > 0 else 0.0
        assert layer.relative_error == pytest.approx(true_error, rel=1e-3, abs=1e-5)


def test_vllm_drops_embeddings_heads_and_saved_modules(tmp_path):
    config = rankwise.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"],
                                 init_lora_weights=False)
    base, _ = saved_adapter(tmp_path / "src", config)
    with pytest.warns(UserWarning, match="embed_tokens"):
        report = export_vllm_lora(base, tmp_path / "src", tmp_path / "vllm", sample_inputs=inputs())
    assert sorted(d["module"] for d in report.dropped) == ["lm_head", "model.embed_tokens"]
    assert report.file_rank == 8 and all(layer.rank == 4 for layer in report.layers)  # source rank, padded up
    # PEFT's output equals the source with only the kept (q, v) updates: embedding update and head copy removed.
    reference = rankwise.load_adapter(copy.deepcopy(base), tmp_path / "src").eval()
    with torch.no_grad():
        reference.model.model.embed_tokens.adapters["default"].lora_B.zero_()
    reference.model.lm_head.modules_to_save["default"].load_state_dict(base.lm_head.state_dict())
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "vllm").eval()
    assert float((run_model(peft_model, inputs()) - run_model(reference, inputs())).abs().max()) < 1e-5
    assert report.output_max_abs_diff > 1e-3  # the dropped parts did change the output, and the report says so


def test_vllm_bad_requests(tmp_path):
    base, _ = saved_adapter(tmp_path / "src", rankwise.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False))
    with pytest.raises(ConfigError, match="nothing to export for vLLM"):
        export_vllm_lora(base, tmp_path / "src", tmp_path / "out")
    base, _ = saved_adapter(tmp_path / "dense", rankwise.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(ConfigError, match="rank=0"):
        export_vllm_lora(base, tmp_path / "dense", tmp_path / "out", rank=0)
    assert not (tmp_path / "out").exists()


def test_exports_replace_the_output_directory_whole_and_refuse_a_file(tmp_path):
    from rankwise.export.merged import export_merged

    base, _ = saved_adapter(tmp_path / "src", rankwise.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    for export in (export_vllm_lora, export_merged):
        out = tmp_path / export.__name__
        out.mkdir()
        (out / "stale.txt").write_text("from an older export")
        export(base, tmp_path / "src", out)
        assert not (out / "stale.txt").exists() and (out / REPORT_NAME).is_file()  # one whole new directory
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging directory left
        target = tmp_path / f"{export.__name__}.file"
        target.write_text("keep me")
        with pytest.raises(ConfigError, match="is a file: pass a directory path for --output"):
            export(base, tmp_path / "src", target)
        assert target.read_text() == "keep me"


def test_vllm_rank_rounding():
    from rankwise.export.vllm_lora import vllm_rank

    assert [vllm_rank(r) for r in (1, 2, 8, 9, 300, 321, 512)] == [1, 8, 8, 16, 320, 512, 512]
    with pytest.raises(ConfigError, match="512"):
        vllm_rank(513)


# ---- GGUF ---------------------------------------------------------------------------------------

def gguf_rows(n_head: int, head_dim: int) -> list[int]:
    """Row order of llama.cpp's q/k tensors: new row h*d + 2i + j holds HF row h*d + j*d/2 + i."""
    order = [0] * (n_head * head_dim)
    for h in range(n_head):
        for i in range(head_dim // 2):
            for j in range(2):
                order[h * head_dim + 2 * i + j] = h * head_dim + j * head_dim // 2 + i
    return order


def read_gguf(path):
    reader = gguf.GGUFReader(path)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    fields = {}
    for key, f in reader.fields.items():
        value = f.parts[f.data[0]] if f.data else None
        fields[key] = bytes(value).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else (value[0] if value is not None else None)
    return tensors, fields


@pytest.mark.parametrize("name", ["lora", "nola", "dense"])
def test_gguf_lora_reads_back_as_llama_cpp_expects(name, tmp_path):
    if name == "dense":  # a full-rank update: LoLDU re-factorises W, so its delta is not low-rank
        config = rankwise.get_method("loldu").config_cls(target_modules=PROJECTIONS)
    else:
        config = method_config(rankwise.get_method(name), PROJECTIONS)
    base, model = saved_adapter(tmp_path / "src", config)
    report = export_gguf_lora(base, tmp_path / "src", tmp_path / "a.gguf", rank=4, sample_inputs=inputs())
    tensors, fields = read_gguf(tmp_path / "a.gguf")
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and float(fields["adapter.lora.alpha"]) == 4.0
    assert len(tensors) == 2 * 2 * len(PROJECTIONS)  # 2 blocks x 7 projections x (lora_a, lora_b)
    deltas = model.delta_weights()
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for layer in report.layers:
        block, short = int(layer.module.split(".")[2]), layer.module.rsplit(".", 1)[1]
        a = tensors[f"blk.{block}.{gguf_names[short]}.weight.lora_a"]
        b = tensors[f"blk.{block}.{gguf_names[short]}.weight.lora_b"]
        out_features, in_features = deltas[layer.module].shape
        assert a.shape == (4, in_features) and b.shape == (out_features, 4)  # ggml ne: a [in, r], b [r, out]
        exact = deltas[layer.module]
        if short in ("q_proj", "k_proj"):
            exact = exact[gguf_rows(N_HEAD if short == "q_proj" else N_KV, HEAD_DIM)]
        error = float((b @ a - exact).norm() / exact.norm())
        assert error == pytest.approx(layer.relative_error, rel=1e-3, abs=1e-5)
        if name == "lora":
            assert error < 1e-5  # a rank-4 LoRA exports exactly at rank 4
    assert json.loads((tmp_path / "a.gguf.report.json").read_text())["file_rank"] == 4


def test_gguf_drops_tied_embedding_and_refuses_other_architectures(tmp_path):
    config = rankwise.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    base, _ = saved_adapter(tmp_path / "src", config)
    with pytest.warns(UserWarning, match="tied"):
        report = export_gguf_lora(base, tmp_path / "src", tmp_path / "a.gguf")
    assert [d["module"] for d in report.dropped] == ["model.embed_tokens"]
    tensors, _ = read_gguf(tmp_path / "a.gguf")
    assert not any("token_embd" in n or n.startswith("output") for n in tensors)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    rankwise.adapt(copy.deepcopy(bert), rankwise.LoraConfig(r=2, target_modules=["query"])).save_adapter(tmp_path / "bert")
    with pytest.raises(ConfigError, match="model types"):
        export_gguf_lora(bert, tmp_path / "bert", tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


def test_gguf_untied_embedding_and_head_use_llama_cpp_layouts(tmp_path):
    base = tiny_llama()
    base.config.tie_word_embeddings = False
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone())
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(r=3, target_modules=["embed_tokens", "lm_head"],
                                                                    init_lora_weights=False))
    model.save_adapter(tmp_path / "src")
    export_gguf_lora(base, tmp_path / "src", tmp_path / "a.gguf")
    tensors, _ = read_gguf(tmp_path / "a.gguf")
    deltas = model.delta_weights()
    # token_embd: lora_a is (vocab x r) so llama.cpp gathers one row per token; lora_b @ lora_aᵀ = ΔW (dim x vocab).
    a, b = tensors["token_embd.weight.lora_a"], tensors["token_embd.weight.lora_b"]
    assert a.shape == (64, 3) and b.shape == (32, 3)
    torch.testing.assert_close(b @ a.T, deltas["model.embed_tokens"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tensors["output.weight.lora_b"] @ tensors["output.weight.lora_a"], deltas["lm_head"],
                               atol=1e-5, rtol=1e-4)


def test_cli_gguf_and_vllm(llama_dir, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(r=4, target_modules=PROJECTIONS, init_lora_weights=False))
    model.save_adapter(tmp_path / "src")
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "gguf", "--model", str(llama_dir), "--output", str(tmp_path / "a.gguf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.gguf").is_file() and "read back identical" in result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "vllm", "--model", str(llama_dir), "-o", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v" / REPORT_NAME).read_text())
    assert report["file_rank"] == 8 and report["output_max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "v" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama_dir)
    bad = runner.invoke(app, ["convert", str(tmp_path / "src"), "--for", "onnx"])
    assert bad.exit_code == 2 and "is not an export" in bad.output


@pytest.mark.slow
def test_gguf_lora_in_llama_cpp(tmp_path):
    """Real runtime (optional): llama.cpp applies our LoRA to the SmolLM2 GGUF like rankwise does (see bench/)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional: see docs/convert.md to build it")
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gguf_lora_runtime.py"
    spec = importlib.util.spec_from_file_location("gguf_lora_runtime", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runtime_check = bench.runtime_check

    result = runtime_check(tmp_path, prompts=2, steps=40)
    assert result["delta_logit_cosine"] > 0.95, result  # measured 0.997-0.9998 (bench/results/gguf_lora_runtime.json)
    assert result["lora_greedy_matches"] == 2, result
    # Without llama.cpp's q/k row permutation the adapter's effect on the logits is visibly wrong.
    assert result["delta_logit_relative_diff"] < result["unpermuted_delta_logit_relative_diff"], result
