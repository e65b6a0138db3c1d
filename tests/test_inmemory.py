"""merge_bora / unload_bora / disable_bora: in memory, proven against `bora-tools merge` and the untouched base."""

import pytest
import torch
from cli_support import run
from torch import nn
from train_support import one_thread  # noqa: F401 (one_thread: an autouse fixture)

from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
from bora_tools.errors import ConfigError, UnsupportedError
from bora_tools.training import (
    BoraLinear,
    add_bora,
    bora_modules,
    disable_bora,
    merge_bora,
    randomize_bora,
    save_bora,
    unload_bora,
)

IDS = torch.tensor([[0, 5, 17, 42, 99, 150, 200, 7, 8, 299]])


def config(arch="llama", **kw):
    return BoraConfig(**{"r": 4, "bora_blocks": 2, "lora_alpha": 8, "target_modules": default_targets(arch), **kw})


def adapted(arch="llama", dtype=torch.float32, seed=3, **kw):
    model = add_bora(build_model(arch, dtype=dtype), config(arch, **kw))
    return randomize_bora(model, seed=seed).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("llama", torch.float16),
                                        ("gpt2", torch.float32)])
def test_merge_bora_gives_the_weights_and_logits_of_the_cli_merge(tmp_path, arch, dtype):
    from transformers import AutoModelForCausalLM

    base_dir = save_model_dir(build_model(arch, dtype=dtype), tmp_path / "base")
    # Loaded as a user loads it (from_pretrained keeps the rotary buffers float32, unlike .to(bfloat16))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = randomize_bora(add_bora(model, config(arch)), seed=3).eval()
    bora = logits(model)
    save_bora(model, tmp_path / "adapter")
    result = run("merge", tmp_path / "adapter", "--base", base_dir, "--out", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    cli_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype).eval()

    merged = merge_bora(model)
    assert merged is model and not bora_modules(merged) and not hasattr(merged, "bora_config")
    assert all(type(m) is not BoraLinear for m in merged.modules())
    cli_state = cli_merged.state_dict()
    for name, tensor in merged.state_dict().items():  # the same arithmetic, the same rounding: equal bits
        assert torch.equal(tensor, cli_state[name]), name
    assert torch.equal(logits(merged), logits(cli_merged))
    base = logits(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype))
    assert (bora - base).abs().max() > 1e-2  # the adapter changes the output...
    tol = 1e-4 if dtype == torch.float32 else 0.1  # ...and the merged model computes what the adapted one did
    assert (logits(merged) - bora).abs().max() < tol
    # A plain model again: trainable as before, save_pretrained writes a full model.
    assert all(p.requires_grad for p in merged.parameters())
    merged.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_unload_bora_gives_the_untouched_base_back():
    reference = build_model("llama")
    model = adapted(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.module.weight.add_(0.5)  # a trained copy of the head
    base = unload_bora(model)
    assert isinstance(base.model.layers[0].self_attn.q_proj, nn.Linear) and isinstance(base.lm_head, nn.Linear)
    assert base.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert all(p.requires_grad for p in base.parameters())  # the flags add_bora found
    with pytest.raises(ConfigError, match="has no BoRA layers"):
        unload_bora(base)


def test_merge_keeps_the_trained_copy_of_modules_to_save():
    model = adapted(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.module.weight.add_(0.5)
    bora = logits(model)
    merged = merge_bora(model)
    assert isinstance(merged.lm_head, nn.Linear)
    torch.testing.assert_close(logits(merged), bora, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disable_bora_runs_the_base_and_restores_the_adapter(dtype):
    model = adapted(dtype=dtype, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.module.weight.add_(0.5)
    base, bora = logits(build_model("llama", dtype=dtype)), logits(model)
    with disable_bora(model):
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), bora, rtol=0, atol=0)
    with pytest.raises(RuntimeError), disable_bora(model):
        raise RuntimeError("a failing reference pass")
    torch.testing.assert_close(logits(model), bora, rtol=0, atol=0)  # restored on the way out of an error too


def test_half_base_with_float32_factors_under_autocast_and_gradient_checkpointing():
    model = adapted(dtype=torch.bfloat16)
    assert all(layer.lora_A.dtype == torch.float32 for layer in bora_modules(model).values())
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # transformers 5.24 renamed it
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
        with disable_bora(model):
            ref_loss = model(input_ids=IDS, labels=IDS).loss
            ref_loss.backward()  # checkpointed: the recomputation runs inside the block as well
    assert all(p.grad is None for p in model.parameters())  # the base alone: nothing to train
    loss.backward()
    for layer in bora_modules(model).values():
        for p in (layer.lora_A, layer.lora_B, layer.bora_sigma):
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_loss = float(build_model("llama", dtype=torch.bfloat16)(input_ids=IDS, labels=IDS).loss)
    assert abs(float(ref_loss.detach()) - base_loss) < 1e-6
    assert abs(float(loss.detach()) - float(ref_loss.detach())) > 1e-3


def test_merge_refuses_a_tied_weight_and_changes_nothing():
    model = add_bora(build_model("qwen2"), config("qwen2", target_modules=["q_proj", "lm_head"]))
    randomize_bora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match=r"lm_head: its weight is shared with model.embed_tokens.weight"):
        merge_bora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert bora_modules(model)


def test_merge_refuses_float16_overflow_and_changes_nothing():
    model = adapted(dtype=torch.float16)
    layer = bora_modules(model)["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        layer.lora_B.fill_(1e6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # core.row_merge refuses the overflow where the value is made (naming the tensor and the dtype's range)
    refused = r"down_proj: (a value \(.*\) overflows float16|the merged weight holds)"
    with pytest.raises(UnsupportedError, match=refused):
        merge_bora(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
