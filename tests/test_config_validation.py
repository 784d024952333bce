"""Issue 20 item 12 and issue 18 item 8: every adapter config refuses bad numbers with a ConfigError naming
the field (before any memory is touched), and PEFT's options get an answer instead of a TypeError."""
from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

import rankwise
from rankwise.cli import app
from rankwise.core.config import MAX_SIZE, _annotation_types
from rankwise.core.errors import ConfigError

from text_task import write_sentiment_csv, write_tiny_classifier

NOT_SIZE = re.compile(r"(seed|prng|key|step|warmup|period|interval|every)")


def _bad_cases():
    """(method, field, bad value) for every numeric field of every registered config."""
    cases = []
    for info in rankwise.list_methods():
        for field in dataclasses.fields(info.config_cls):
            types = _annotation_types(field.type)
            if not types & {"int", "float"}:
                continue
            values = [float("inf"), float("nan"), float("-inf")]
            if "bool" not in types:
                values.append(True)
            if "int" in types and "float" not in types and "bool" not in types:
                values.append(-1 if "seed" not in field.name else -(10**30))
                if not NOT_SIZE.search(field.name):
                    values += [10**9, MAX_SIZE + 1]
            cases += [pytest.param(info.name, field.name, v, id=f"{info.name}.{field.name}={v!r}") for v in values]
    return cases


BAD = _bad_cases()


def test_the_fuzz_covers_every_method():
    assert {p.values[0] for p in BAD} == {m.name for m in rankwise.list_methods()}
    assert len(BAD) > 250


@pytest.mark.parametrize("method,field,value", BAD)
def test_bad_numeric_value_is_a_config_error_naming_the_field(method, field, value):
    cls = rankwise.get_method(method).config_cls
    with pytest.raises(ConfigError, match=re.escape(field)):
        cls(**{field: value})


@pytest.mark.parametrize("method,field", [("mos", "equivalent_rank"), ("nola", "num_bases_a"), ("nola", "num_bases_b"),
                                          ("snell", "low_rank_dim"), ("snella", "low_rank_dim")])
def test_unallocatable_sizes_are_refused_before_allocation(method, field):
    cls = rankwise.get_method(method).config_cls
    with pytest.raises(ConfigError, match=f"{field}=1000000000 .*at most"):
        cls(**{field: 10**9})


def test_non_finite_inside_a_pattern_dict_is_refused():
    with pytest.raises(ConfigError, match="alpha_pattern"):
        rankwise.LoraConfig(alpha_pattern={"q": float("inf")})


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as err:
        rankwise.LoraConfig(init_lora_weights="x" * 5_000_000)
    assert len(str(err.value)) < 1000 and "characters" in str(err.value)


# ---- PEFT options (issue 18 item 8) -----------------------------------------------------------------
def test_task_type_is_accepted_and_saved(tmp_path):
    from toy_models import MLP

    config = rankwise.LoraConfig(target_modules=["lin0"], r=2, task_type="CAUSAL_LM")
    model = rankwise.adapt(MLP(), config)
    model.save_adapter(tmp_path)
    assert rankwise.core.io.read_config(tmp_path).task_type == "CAUSAL_LM"
    assert rankwise.NolaConfig(task_type="SEQ_CLS").to_dict()["task_type"] == "SEQ_CLS"


@pytest.mark.parametrize("kwargs", [dict(bias="none"), dict(use_dora=False), dict(layers_to_transform=None),
                                    dict(inference_mode=False)])
def test_peft_options_at_their_neutral_value_are_accepted(kwargs):
    rankwise.LoraConfig(**kwargs)
    rankwise.NolaConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [(dict(bias="all"), "bias"), (dict(use_dora=True), "use_dora"),
                                          (dict(layers_to_transform=[0]), "layers_to_transform"),
                                          (dict(layers_pattern="layers"), "layers_pattern")])
def test_unimplemented_peft_options_are_refused_naming_them(kwargs, field):
    for cls in (rankwise.LoraConfig, rankwise.RandLoraConfig, rankwise.NolaConfig):
        with pytest.raises(ConfigError, match=f"{field}=.*not supported"):
            cls(**kwargs)


def test_unknown_keyword_is_a_config_error_with_close_matches():
    with pytest.raises(ConfigError, match="no field 'lora_alpah'.*Did you mean lora_alpha"):
        rankwise.LoraConfig(lora_alpah=16)
    with pytest.raises(ConfigError, match="no field 'nosuchkey'"):
        rankwise.NolaConfig(nosuchkey=3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-options")
    return write_tiny_classifier(root / "model"), write_sentiment_csv(root / "data.csv")


@pytest.mark.parametrize("option,expected", [("nosuchkey=3", "no field 'nosuchkey'"), ("use_dora=true", "use_dora=True"),
                                             ("bias=all", "bias='all'"), ("lora_alpha=Infinity", "lora_alpha=inf")])
def test_cli_option_errors_are_clear(tiny_run, tmp_path, option, expected):
    model_dir, data = tiny_run
    result = CliRunner().invoke(app, ["finetune", "--data", str(data), "--model", str(model_dir), "--train-size", "20",
                                      "--test-size", "10", "--output", str(tmp_path / "run"), "--option", option])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert expected in text and "Traceback" not in text


def _compress_cases():
    from rankwise.compress import available_methods, get_method

    cases = []
    for name in available_methods():
        cls = get_method(name)[0]
        for field in dataclasses.fields(cls):
            types = _annotation_types(field.type)
            if types & {"int", "float"}:
                values = [float("inf"), float("nan")] + ([True] if "bool" not in types else [])
                cases += [pytest.param(cls, field.name, v, id=f"{name}.{field.name}={v!r}") for v in values]
    return cases


@pytest.mark.parametrize("cls,field,value", _compress_cases())
def test_compressor_configs_share_the_numeric_checks(cls, field, value):
    with pytest.raises(ConfigError, match=re.escape(field)):
        cls(**{field: value})
