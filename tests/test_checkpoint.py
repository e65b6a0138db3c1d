"""Adapter directories: config rules, round trips, and every validation failure."""

import json
import logging
import os
import pickle

import pytest
import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from bora_tools.core.adapter import (
    PREFIX,
    BoraAdapter,
    BoraModule,
    adapter_from_tensors,
    check_against_base,
    load_adapter,
    save_adapter,
)
from bora_tools.core.config import BoraConfig, matches_target, pattern_key
from bora_tools.errors import CheckpointError, ConfigError, OutputExistsError, ShapeError

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"


def make_adapter(tmp_path, *, b=2, r=4, shapes=None, config=None, name="adapter", **cfg):
    shapes = shapes or {Q: (8, 8), V: (4, 8)}
    config = config or BoraConfig(r=r, bora_blocks=b, lora_alpha=8, target_modules=["q_proj", "v_proj"], **cfg)
    modules = {}
    for n, (m, k) in shapes.items():
        rr = config.rank_for(n)
        modules[n] = BoraModule(n, torch.randn(rr, k), torch.randn(m, rr), torch.randn(b, b, rr), config.scaling_for(n))
    adapter = BoraAdapter(config=config, modules=modules)
    return save_adapter(adapter, tmp_path / name), adapter


def rewrite_tensors(path, mutate):
    from safetensors.torch import load_file
    tensors = load_file(path / "adapter_model.safetensors")
    mutate(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


# -- config ---------------------------------------------------------------

def test_config_defaults_and_scaling():
    cfg = BoraConfig(r=8, bora_blocks=2)
    assert cfg.lora_alpha == 8 and cfg.scaling_for("x") == 1.0
    cfg = BoraConfig(r=16, bora_blocks=2, lora_alpha=8, use_rslora=True)
    assert cfg.scaling_for("x") == pytest.approx(8 / 4)


@pytest.mark.parametrize("name", [Q, V, "model.layers.10.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"])
def test_pattern_matching_agrees_with_peft(name):
    patterns = {"layers.1.self_attn.q_proj": 2, "layers.10.self_attn.q_proj": 3, "q_proj": 4, r".*\.mlp\..*": 5}
    ours = pattern_key(patterns, name)
    assert (ours if ours is not None else name) == get_pattern_key(list(patterns), name)


def test_rank_and_alpha_patterns():
    cfg = BoraConfig(r=4, bora_blocks=2, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})
    assert (cfg.rank_for(V), cfg.alpha_for(V), cfg.scaling_for(V)) == (2, 8.0, 4.0)
    assert (cfg.rank_for(Q), cfg.alpha_for(Q), cfg.scaling_for(Q)) == (4, 32.0, 8.0)


def test_target_modules_rules():
    assert matches_target(["q_proj"], Q) and not matches_target(["proj"], Q)
    assert matches_target(r".*\.(q|v)_proj", V) and not matches_target(r"(q|v)_proj", V)


def test_unknown_keys_are_kept_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="bora_tools"):
        cfg = BoraConfig.from_dict({"peft_type": "BORA", "r": 2, "bora_blocks": 1, "shiny": True})
    assert "shiny" in caplog.text and cfg.to_dict()["shiny"] is True


@pytest.mark.parametrize("data,match", [
    ({"peft_type": "LORA", "r": 2, "bora_blocks": 1}, "peft_type: expected 'BORA', found 'LORA'"),
    ({"peft_type": "BORA", "bora_blocks": 1}, "missing required key.*r"),
    ({"peft_type": "BORA", "r": 0, "bora_blocks": 1}, "r: expected an integer >= 1, found 0"),
    ({"peft_type": "BORA", "r": 2, "bora_blocks": "4"}, "bora_blocks: expected an integer"),
    ({"peft_type": "BORA", "r": 2, "bora_blocks": 1, "rank_pattern": {"q(": 2}}, "not a valid regular expression"),
    ({"peft_type": "BORA", "r": 2, "bora_blocks": 1, "alpha_pattern": {"q": "x"}}, r"alpha_pattern\['q'\]"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_configs(data, match):
    with pytest.raises(ConfigError, match=match):
        BoraConfig.from_dict(data)


def test_every_config_problem_reported_at_once():
    with pytest.raises(ConfigError, match="3 problems") as e:
        BoraConfig.from_dict({"peft_type": "BORA", "r": -1, "bora_blocks": 0, "use_rslora": "yes"})
    assert all(k in str(e.value) for k in ("r:", "bora_blocks:", "use_rslora:"))


# -- round trip -----------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    path, adapter = make_adapter(tmp_path, rank_pattern={"v_proj": 2}, use_rslora=True)
    loaded = load_adapter(path)
    assert loaded.config.to_dict() == adapter.config.to_dict()
    for name, mod in adapter.modules.items():
        got = loaded.modules[name]
        assert torch.equal(got.A, mod.A) and torch.equal(got.B, mod.B) and torch.equal(got.sigma, mod.sigma)
        assert got.scaling == mod.scaling
    assert loaded.modules[V].r == 2
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BORA" and config["bora_blocks"] == 2


def test_half_precision_factors_load(tmp_path):
    path, _ = make_adapter(tmp_path)
    rewrite_tensors(path, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    assert load_adapter(path).modules[Q].A.dtype == torch.bfloat16


def test_save_refuses_existing_target(tmp_path):
    path, adapter = make_adapter(tmp_path)
    with pytest.raises(OutputExistsError):
        save_adapter(adapter, path)
    save_adapter(adapter, path, overwrite=True)


def test_modules_to_save_round_trip(tmp_path):
    config = BoraConfig(r=2, bora_blocks=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = BoraAdapter(config, {Q: BoraModule(Q, torch.randn(2, 8), torch.randn(8, 2), torch.ones(1, 1, 2), 1.0)},
                          saved={"lm_head.weight": torch.randn(10, 8)})
    loaded = load_adapter(save_adapter(adapter, tmp_path / "a"))
    assert torch.equal(loaded.saved["lm_head.weight"], adapter.saved["lm_head.weight"])


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    path, adapter = make_adapter(tmp_path)
    tensors = adapter.state_dict()
    os.remove(path / "adapter_model.safetensors")
    torch.save(tensors, path / "adapter_model.bin")
    assert torch.equal(load_adapter(path).modules[Q].A, adapter.modules[Q].A)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_legacy_pickle_never_executes(tmp_path, monkeypatch):
    path, _ = make_adapter(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="adapter_model.bin: refused"):
        load_adapter(path)
    assert not (tmp_path / "PWNED").exists()


# -- validation -----------------------------------------------------------

def _drop(key):
    return lambda t: t.pop(key)


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (_drop(PREFIX + Q + ".bora_sigma"), CheckpointError, "q_proj: module is missing .*q_proj.bora_sigma"),
        (
            lambda t: t.update({PREFIX + Q + ".bora_sigma": torch.ones(2, 2, 3)}),
            ShapeError,
            r"expected shape \(2, 2, 4\)",
        ),
        (
            lambda t: t.update({PREFIX + Q + ".lora_B.weight": torch.ones(8, 3)}),
            CheckpointError,
            "has rank 3, but lora_A has rank 4",
        ),
        (
            lambda t: t.update({PREFIX + Q + ".lora_A.weight": torch.full((4, 8), float("nan"))}),
            CheckpointError,
            "q_proj.lora_A.weight: 32 non-finite",
        ),
        (
            lambda t: t.update({PREFIX + Q + ".lora_A.weight": torch.ones(4, 8, dtype=torch.int32)}),
            CheckpointError,
            "expected a float tensor",
        ),
        (
            lambda t: t.update({"base_model.model.x.lora_C.weight": torch.ones(1)}),
            CheckpointError,
            "lora_C.weight: unexpected key",
        ),
        (lambda t: t.update({"model.q_proj.lora_A.weight": torch.ones(1)}), CheckpointError, "unexpected key"),
    ],
)
def test_bad_tensors(tmp_path, mutate, error, match):
    path, _ = make_adapter(tmp_path)
    rewrite_tensors(path, mutate)
    with pytest.raises(error, match=match):
        load_adapter(path)


def test_blocks_that_do_not_divide_name_module_dimension_and_b(tmp_path):
    path, _ = make_adapter(tmp_path, b=2, shapes={Q: (6, 8)})
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["bora_blocks"] = 3
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    rewrite_tensors(path, lambda t: t.update({PREFIX + Q + ".bora_sigma": torch.ones(3, 3, 4)}))
    with pytest.raises(CheckpointError, match=r"q_proj: in_features n=8 is not divisible by bora_blocks b=3"):
        load_adapter(path)


def test_rank_disagreeing_with_config(tmp_path):
    path, _ = make_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"v_proj": 2}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config gives r=2 for model.layers.0.self_attn.v_proj"):
        load_adapter(path)


def test_all_problems_reported_together(tmp_path):
    path, _ = make_adapter(tmp_path)
    rewrite_tensors(
        path,
        lambda t: (
            t.pop(PREFIX + Q + ".lora_B.weight"),
            t.update({PREFIX + V + ".lora_A.weight": torch.full((4, 8), float("inf"))}),
        ),
    )
    with pytest.raises(CheckpointError, match="2 problems") as e:
        load_adapter(path)
    assert "q_proj" in str(e.value) and "v_proj.lora_A.weight" in str(e.value)


@pytest.mark.parametrize(
    "content", [b"", b"\x05", b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"]
)
def test_corrupt_safetensors(tmp_path, content):
    path, _ = make_adapter(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(path)


def test_truncated_safetensors(tmp_path):
    path, _ = make_adapter(tmp_path)
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_adapter(path)


@pytest.mark.parametrize("text,match", [("{", "not valid JSON"), ('{"peft_type": "BORA"}', "missing required")])
def test_bad_config_file(tmp_path, text, match):
    path, _ = make_adapter(tmp_path)
    (path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_adapter(path)


def test_missing_weights_and_missing_dir(tmp_path):
    path, _ = make_adapter(tmp_path)
    os.remove(path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        load_adapter(path)
    with pytest.raises(CheckpointError, match="not an adapter directory"):
        load_adapter(tmp_path / "nope")


def test_module_outside_target_modules(tmp_path):
    path, _ = make_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="v_proj is not matched by target_modules"):
        load_adapter(path)


def test_check_against_base(tmp_path):
    _, adapter = make_adapter(tmp_path)
    shapes = {Q + ".weight": (8, 8), V + ".weight": (4, 8)}
    check_against_base(adapter, shapes.get)
    with pytest.raises(ShapeError, match=r"v_proj.weight, the base has \(8, 4\)"):
        check_against_base(adapter, {**shapes, V + ".weight": (8, 4)}.get)
    with pytest.raises(ShapeError, match="has no tensor model.layers.0.self_attn.q_proj.weight"):
        check_against_base(adapter, {V + ".weight": (4, 8)}.get)
    adapter.config.fan_in_fan_out = True  # Conv1D stores (in, out)
    check_against_base(adapter, {Q + ".weight": (8, 8), V + ".weight": (8, 4)}.get)


def test_empty_adapter_refused():
    with pytest.raises(CheckpointError, match="no adapted module"):
        adapter_from_tensors(BoraConfig(r=1, bora_blocks=1), {})
