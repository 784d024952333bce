"""The examples in docs/ run: every fenced ```python block of docs/**/*.md is executed in a fresh
namespace inside a temporary directory (tiny models built from configs, no downloads).

A block is skipped only when the line before its fence is exactly `<!-- no-test -->` (examples that
need a real model or data set, or minutes of CPU); their number is capped so skipping cannot spread.
"""
from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise.train.procedures import PROCEDURES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "<!-- no-test -->"
MAX_SKIPPED = 12


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line number of the fence, code, skipped) for each ```python block of one markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"{path}:{start + 1}: unclosed ```python block")
            blocks.append((start + 1, "\n".join(body) + "\n", previous == SKIP_MARK))
        i += 1
    return blocks


def all_blocks():
    out = []
    for path in sorted(DOCS.rglob("*.md")):
        for line, code, skipped in python_blocks(path):
            out.append((f"{path.relative_to(DOCS)}:{line}", code, skipped))
    return out


BLOCKS = all_blocks()


@pytest.mark.parametrize("where,code", [(w, c) for w, c, s in BLOCKS if not s], ids=[w for w, c, s in BLOCKS if not s])
def test_doc_example_runs(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    # a real (fresh) module, as when the block is run as a script: dataclasses and pickling look classes up in sys.modules
    module = types.ModuleType("__docs_example__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, where, "exec"), module.__dict__)


def test_collector_sees_fences_and_skip_marks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
                    "```bash\nrankwise methods\n```\n")
    assert python_blocks(page) == [(3, "x = 1\n", False), (8, "raise SystemExit\n", True)]
    page.write_text("```python\nx = 1\n")
    with pytest.raises(AssertionError, match="unclosed"):
        python_blocks(page)


def test_few_examples_are_skipped():
    skipped = [w for w, c, s in BLOCKS if s]
    assert len(BLOCKS) - len(skipped) >= 40, "the docs should carry runnable examples"
    assert len(skipped) <= MAX_SKIPPED, f"too many untested examples ({len(skipped)}): {skipped}"


def _page_checks(page: Path, directive: str):
    assert page.exists(), f"missing docs page {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    assert f"::: {directive}" in text, f"{page.name} does not render {directive} from its docstring"
    assert re.search(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}", text), f"{page.name} has no arXiv link"
    assert any(not s for _, _, s in python_blocks(page)), f"{page.name} has no tested example"


@pytest.mark.parametrize("method", [m.name for m in rankwise.list_methods()])
def test_every_adapter_has_a_page(method):
    info = rankwise.get_method(method)
    page = DOCS / "methods" / f"{'miss' if method == 'bone' else method}.md"
    _page_checks(page, f"{info.config_cls.__module__}.{info.config_cls.__name__}")


@pytest.mark.parametrize("name", sorted(PROCEDURES))
def test_every_procedure_has_a_page(name):
    module, _, cls = PROCEDURES[name].cls_path.partition(":")
    _page_checks(DOCS / "procedures" / f"{name}.md", f"{module}.{cls}")


@pytest.mark.parametrize("name", ["svd", "svd-llm", "asvd", "lord", "modegpt", "afm", "pela", "loram"])
def test_every_compressor_has_a_page(name):
    from rankwise.compress import get_method

    config_cls, _ = get_method(name)
    _page_checks(DOCS / "compress" / f"{name}.md", f"{config_cls.__module__}.{config_cls.__name__}")


@pytest.mark.parametrize("page,directive", [
    ("compress/welore.md", "rankwise.compress.welore.WeLoreConfig"),
    ("optimizers/galore.md", "rankwise.optim.galore.GaLoreAdamW"),
    ("optimizers/dct.md", "rankwise.optim.dct.DCTAdamW"),
    ("optimizers/riemannian.md", "rankwise.optim.riemannian.RiemannianAdamW"),
    ("pretrain/sltrain.md", "rankwise.pretrain.sltrain.SLTrainLinear"),
    ("pretrain/lost.md", "rankwise.pretrain.lost.LOSTLinear"),
    ("federated/lora-fair.md", "rankwise.federated.lora_fair.LoraFairStrategy"),
    ("federated/baselines.md", "rankwise.federated.baselines.StackingStrategy"),
    ("solvers/completion.md", "rankwise.solvers.completion.altmin_completion"),
    ("solvers/sensing.md", "rankwise.solvers.sensing.matrix_sensing"),
    ("solvers/subgm.md", "rankwise.solvers.subgm.subgm"),
    ("solvers/streaming-eig.md", "rankwise.solvers.streaming_eig.streaming_top_eigenvector"),
    ("layers/s4d.md", "rankwise.layers.s4d.S4D"),
    ("analysis/spectra.md", "rankwise.analysis.spectra.spectrum"),
    ("analysis/mnn.md", "rankwise.analysis.mnn.matrix_nuclear_norm"),
    ("analysis/intrinsic-dim.md", "rankwise.analysis.intrinsic_dim.SubspaceModel"),
])
def test_every_other_method_has_a_page(page, directive):
    module, _, name = directive.rpartition(".")
    import importlib

    assert hasattr(importlib.import_module(module), name), f"{directive} does not exist (renamed?)"
    _page_checks(DOCS / page, directive)


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert [p for p in pages if p not in nav] == []


def _rendered_fields():
    """{config class path: docstring text} as the docs site renders it (griffe + docs/_ext/config_fields.py)."""
    griffe = pytest.importorskip("griffe", reason="the docs extra (pip install -e '.[docs]') is not installed")
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from config_fields import ConfigFields
    finally:
        sys.path.pop(0)
    package = griffe.load("rankwise", search_paths=[str(ROOT)], extensions=griffe.load_extensions(ConfigFields()),
                          docstring_parser="google")
    return package


def test_generated_config_tables_list_every_field_with_its_real_default():
    import dataclasses

    package = _rendered_fields()
    configs = [info.config_cls for info in rankwise.list_methods()]
    from rankwise.compress import get_method

    configs += [get_method(name)[0] for name in ("svd", "svd-llm", "asvd", "lord", "modegpt", "afm", "pela", "loram")]
    for cls in configs:
        obj = package[cls.__module__.removeprefix("rankwise.") + "." + cls.__name__]
        sections = {s.kind.value: s for s in obj.docstring.parse("google")}
        assert "attributes" in sections, f"{cls.__name__}: no fields table"
        rows = {a.name: a.description for a in sections["attributes"].value}
        assert list(rows) == [f.name for f in dataclasses.fields(cls)], cls.__name__
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                continue
            shown = re.search(r"Default: `(.*)`\.$", rows[field.name])
            assert shown, f"{cls.__name__}.{field.name}: no default shown"
            try:
                assert ast.literal_eval(shown[1]) == value, f"{cls.__name__}.{field.name}: {shown[1]} != {value!r}"
            except ValueError:  # a name or call (e.g. DECODER_TARGETS, list(LORA_TARGETS)): at least not a literal lie
                assert not isinstance(value, (int, float, bool, str)) or value is None, f"{cls.__name__}.{field.name}: {shown[1]}"
