"""bench/compress_smollm2.py's measuring and rendering helpers on tiny inputs (no real model, no timing claims)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture()
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its sibling _compress_results
    module = importlib.import_module("compress_smollm2")
    page = tmp_path / "compress.md"
    page.write_text(f"# page\n\nbefore\n\n{module.DOC_BEGIN}\nold\n{module.DOC_END}\n\nafter\n")
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "DOC_PAGE", page)
    monkeypatch.setattr(module, "DOC_IMAGE", tmp_path / "img" / "compress_smollm2.png")
    yield module
    sys.modules.pop("compress_smollm2", None)


def _row(method, ratio, ppl, fwd, gen, variant=""):
    speed = {"forward_1x128": {"tokens_per_s": 100 * fwd, "dense_tokens_per_s": 100.0, "speed_ratio": fwd},
             "generate_64": {"tokens_per_s": 10 * gen, "dense_tokens_per_s": 10.0, "speed_ratio": gen}}
    return {"method": method, "variant": variant, "ratio": ratio, "measured_ratio": ratio - 0.002, "perplexity": ppl,
            "params_after": 1000, "params_before": 1200, "compress_seconds": 3.0, "speed": speed}


def test_interleaved_speed_alternates_and_reports_the_ratio(bench):
    calls = []
    fast, slow = object(), object()

    def measure(model):
        calls.append("fast" if model is fast else "slow")
        return 1.0 if model is fast else 4.0

    out = bench.interleaved_speed(slow, fast, measure, tokens=8, repeats=4)
    # one warm-up each, then the first model of each round alternates
    assert calls == ["slow", "fast", "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow"]
    assert out["speed_ratio"] == pytest.approx(4.0)
    assert out["tokens_per_s"] == pytest.approx(8.0) and out["dense_tokens_per_s"] == pytest.approx(2.0)


def test_generation_timing_produces_exactly_the_requested_tokens(bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=3)).eval()
    assert bench._time_generate(model, torch.randint(4, 64, (1, 5)), 7) > 0  # raises if generation stopped early


def test_render_names_the_lowest_perplexity_per_ratio_and_keeps_the_page_around_the_markers(bench, tmp_path):
    data = {"meta": {"base": 20.0, "speed_protocol": "interleaved"},
            "runs": [_row("svd", 0.9, 9e5, 0.8, 1.3), _row("afm", 0.9, 40.0, 0.7, 0.9),
                     _row("modegpt", 0.9, 25.0, 1.05, 1.1, "scatter"), _row("afm", 0.7, 60.0, 0.7, 0.9),
                     _row("modegpt", 0.7, 80.0, 1.2, 1.2, "scatter"),
                     {"method": "lord", "variant": "", "ratio": 0.9, "measured_ratio": 0.9, "perplexity": 1.0,
                      "params_after": 1, "params_before": 2, "latency_ms": 5.0}]}  # an old row: no speed, not ranked
    (tmp_path / "compress_smollm2.md").write_text(f"stale table\n{bench.MD_NOTES}\nmy notes\n")
    bench.render(data, "compress_smollm2")
    best = bench.best_by_ratio(data).splitlines()
    assert "**modegpt (scatter)**" in best[0] and "ratio 0.9" in best[0] and "within 1.3" in best[0]
    assert "**afm**" in best[1] and "ratio 0.7" in best[1] and "not within" in best[1]
    md = (tmp_path / "compress_smollm2.md").read_text()
    assert md.endswith(f"{bench.MD_NOTES}\nmy notes\n") and "stale table" not in md
    assert "| lord | 0.9 |" in md and "**1.05**" in md
    page = (tmp_path / "compress.md").read_text()
    assert page.startswith("# page\n\nbefore\n\n") and page.endswith("\n\nafter\n") and "\nold\n" not in page
    assert "compress/compress_smollm2.png" in page and (tmp_path / "img" / "compress_smollm2.png").stat().st_size > 0


def test_results_merge_across_invocations(bench, tmp_path):
    from _compress_results import existing_rows, merge_results

    path = tmp_path / "r.json"
    merge_results(path, [_row("svd", 0.9, 1.0, 1, 1)], {"base": 1.0})
    merge_results(path, [_row("svd", 0.8, 2.0, 1, 1), _row("svd", 0.9, 3.0, 1, 1)], {"base": 1.0})
    assert existing_rows(path) == {("svd", "", 0.9), ("svd", "", 0.8)}
    assert {r["ratio"]: r["perplexity"] for r in json.loads(path.read_text())["runs"]} == {0.9: 3.0, 0.8: 2.0}
