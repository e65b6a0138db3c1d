"""BoRA layers on real transformers models: no-op init, exact forward, PEFT parity, training, save/load."""

import pytest
import torch
from torch import nn

from bora_tools.core.config import BoraConfig
from bora_tools.core.factors import delta_weight
from bora_tools.demo.tiny import build_model, default_targets
from bora_tools.errors import ConfigError, ShapeError
from bora_tools.training import BoraLinear, add_bora, bora_adapter, bora_modules, load_bora, randomize_bora, save_bora

IDS = torch.tensor([[0, 5, 17, 42, 99, 150, 200, 7, 8, 299]])


def config(arch="llama", **kw):
    base = dict(r=4, bora_blocks=2, lora_alpha=8, target_modules=default_targets(arch))
    return BoraConfig(**{**base, **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_new_adapter_is_a_noop(arch):
    model = build_model(arch)
    ref = model(IDS).logits
    add_bora(model, config(arch))
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    for layer in bora_modules(model).values():  # PEFT-like init
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.all(layer.bora_sigma == 1)
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_layer_output_equals_dense_update(fan_in_fan_out):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(12, 8) if fan_in_fan_out else nn.Linear(8, 12)  # m=12, n=8
    layer = BoraLinear(base, r=3, blocks=4, scaling=1.5)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.bora_sigma.normal_()
    x = torch.randn(2, 5, 8)
    w = base.weight.T if fan_in_fan_out else base.weight  # (m, n)
    dw = delta_weight(layer.lora_A, layer.lora_B, layer.bora_sigma, 1.5)
    expected = x @ (w + dw).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_b1_sigma1_equals_a_real_peft_lora_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(16, 24)), LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    lora = peft_model.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    ours = BoraLinear(nn.Linear(16, 24), r=4, blocks=1, scaling=2.0)
    with torch.no_grad():
        ours.base_layer.load_state_dict(lora.base_layer.state_dict())
        ours.lora_A.copy_(lora.lora_A["default"].weight)
        ours.lora_B.copy_(lora.lora_B["default"].weight)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), lora(x), rtol=1e-6, atol=1e-6)


def test_gradients_reach_a_b_and_sigma_only():
    model = add_bora(build_model("llama"), config())
    randomize_bora(model)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in model.named_parameters():
        if any(k in name for k in ("lora_A", "lora_B", "bora_sigma")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.slow
def test_training_lowers_the_loss():
    model = add_bora(build_model("llama"), config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_dropout_only_in_training():
    model = add_bora(build_model("llama"), config(), dropout=0.5)
    randomize_bora(model)
    model.eval()
    torch.testing.assert_close(model(IDS).logits, model(IDS).logits)
    model.train()
    assert not torch.allclose(model(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("arch,extra", [
    ("llama", {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3.0}, "use_rslora": True}),
    ("gpt2", {"fan_in_fan_out": True}),
    ("qwen2", {"modules_to_save": ["lm_head"], "tie": False}),
])
def test_save_then_load_gives_identical_outputs(tmp_path, arch, extra):
    model_kwargs = {"tie": extra.pop("tie")} if "tie" in extra else {}
    model = add_bora(build_model(arch, **model_kwargs), config(arch, **extra))
    randomize_bora(model, seed=3)
    if extra.get("modules_to_save"):
        with torch.no_grad():
            model.lm_head.module.weight.add_(0.1)
    out = model(IDS).logits
    save_bora(model, tmp_path / "a")
    loaded = load_bora(build_model(arch, **model_kwargs), tmp_path / "a")
    torch.testing.assert_close(loaded(IDS).logits, out, rtol=0, atol=0)
    assert sum(m.num_parameters for m in bora_adapter(loaded).modules.values()) == sum(
        p.numel() for n, p in loaded.named_parameters() if "lora_" in n or "bora_" in n)


def test_errors():
    with pytest.raises(ConfigError, match="matched no linear module"):
        add_bora(build_model("llama"), config(target_modules=["nope"]))
    with pytest.raises(ConfigError, match=r"q_proj: out_features m=64 is not divisible by bora_blocks b=3|"
                                          r"in_features n=64 is not divisible by bora_blocks b=3"):
        add_bora(build_model("llama"), config(bora_blocks=3))
    with pytest.raises(ConfigError, match="target_modules: required"):
        add_bora(build_model("llama"), BoraConfig(r=2, bora_blocks=1))


def test_load_into_wrong_base_is_refused(tmp_path):
    model = add_bora(build_model("llama"), config())
    save_bora(model, tmp_path / "a")
    with pytest.raises(ShapeError, match="another base model"):
        load_bora(build_model("llama", hidden=32, intermediate=64), tmp_path / "a")


def test_callers_config_is_never_modified_and_nested_saves_are_refused():
    cfg = config("gpt2")
    add_bora(build_model("gpt2"), cfg)
    assert cfg.fan_in_fan_out is False  # the model got a copy with fan_in_fan_out=True
    with pytest.raises(ConfigError, match="modules_to_save: model.layers.0.mlp holds submodules"):
        add_bora(build_model("llama"), config(modules_to_save=["mlp"]))
