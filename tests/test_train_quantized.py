"""BoRA on a base quantized by bitsandbytes as it loads (`train --load-in-4bit` / `--load-in-8bit`, QLoRA-style), on
the CPU: the loss falls, gradient checkpointing trains the same adapter, the adapter loads back onto the 4-bit model
with the training model's logits exactly, and merged into the full-precision base it is as close to the 4-bit model
as that base is to its own 4-bit copy.

Measured on the tiny llama (seeded, so the same every run): the base's own 4-bit error is 0.255 (max |logit
difference|, float32 base vs NF4 base); the merged model differs from the 4-bit model with the adapter by 0.306; the
adapter moves the logits by 2.5. Bounds: 1.5x the base's own error, and the adapter's effect over 5x the merge's
difference (a merge that left the adapter out would differ by 2.5).
"""

import json
import sys

import pytest
import torch
from cli_support import run
from train_support import one_thread  # noqa: F401 (one_thread: an autouse fixture)

from bora_tools.core.adapter import load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import TEXT, build_model, save_model_dir
from bora_tools.training import add_bora, load_bora, quantized, save_bora, trainable_parameters

pytest.importorskip("accelerate")
pytest.importorskip("bitsandbytes")
CPU = torch.device("cpu")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    base = save_model_dir(build_model("llama"), root / "base")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in TEXT.splitlines() if line.strip()))
    return base, data


def train_args(inputs, out, *extra):
    base, data = inputs
    return ["train", "--base", base, "--data", data, "--out", out, "-r", 4, "--blocks", 2, "--lr", 2e-2,
            "--batch-size", 4, "--device", "cpu", "--logging-steps", 1, "--quiet", "--json", *extra]


def four_bit(base):
    return quantized.load_quantized(base, load_in_4bit=True, dtype=None, device=CPU)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_training_on_a_quantized_base_lowers_the_loss(tmp_path, inputs, bits):
    result = run(*train_args(inputs, tmp_path / "out", "--max-steps", 4, f"--load-in-{bits}bit"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 4 and report["loss_last"] < report["loss_first"] - 0.1, report["losses"]
    assert report["total_parameters"] == trainable_parameters(build_model("llama")).total + report[
        "trainable_parameters"]  # 4-bit weights count their values, as PEFT counts them
    adapter = load_adapter(tmp_path / "out")
    # The usual adapter format, float32 factors, recording the full-precision base it merges into.
    assert adapter.config.base_model_name_or_path == str(inputs[0])
    assert {t.dtype for t in adapter.state_dict().values()} == {torch.float32}


@pytest.mark.slow
def test_gradient_checkpointing_on_a_4bit_base_trains_the_same_adapter(tmp_path, inputs):
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        result = run(*train_args(inputs, tmp_path / name, "--max-steps", 3, "--load-in-4bit", *extra))
        assert result.exit_code == 0, result.output
    a, b = load_adapter(tmp_path / "plain").state_dict(), load_adapter(tmp_path / "checkpointed").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float(b[k].abs().max()) for k in b if k.endswith("lora_B.weight")) > 1e-3  # it trained


@pytest.mark.slow
def test_a_4bit_run_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path, inputs):
    first = run(*train_args(inputs, tmp_path / "a", "--max-steps", 4, "--save-steps", 2, "--load-in-4bit"))
    assert first.exit_code == 0, first.output
    ckpts = tmp_path / "a-checkpoints"
    (ckpts / "checkpoint-4").rename(tmp_path / "moved")  # as if the run had stopped after step 2
    second = run(*train_args(inputs, tmp_path / "b", "--max-steps", 4, "--save-steps", 2, "--load-in-4bit",
                             "--checkpoint-dir", ckpts, "--resume"))
    assert second.exit_code == 0, second.output
    a, b = load_adapter(tmp_path / "a").state_dict(), load_adapter(tmp_path / "b").state_dict()
    at2 = load_adapter(ckpts / "checkpoint-2").state_dict()
    assert max(float((a[k] - at2[k]).abs().max()) for k in a) > 1e-3  # steps 3-4 moved the adapter
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_the_adapter_loads_back_exactly_and_merges_into_the_full_precision_base(tmp_path, inputs):
    from transformers import AutoModelForCausalLM

    base = inputs[0]
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    model = quantized.prepare_for_training(add_bora(four_bit(base), BoraConfig(
        r=4, bora_blocks=2, lora_alpha=8, target_modules=TARGETS, base_model_name_or_path=str(base))))
    assert type(model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    save_bora(model, tmp_path / "adapter")

    loaded = load_bora(four_bit(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained)  # exactly: the same 4-bit weights, the same factors

    result = run("merge", tmp_path / "adapter", "--base", base, "--out", tmp_path / "merged", "--quiet")
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(ids).logits
        base_4bit = four_bit(base).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(ids).logits
    own_error = float((full - base_4bit).abs().max())  # the base's own 4-bit error: 0.255
    merge_difference = float((merged - trained).abs().max())  # 0.306
    assert merge_difference < 1.5 * own_error, (merge_difference, own_error)
    assert float((merged - full).abs().max()) > 5 * merge_difference  # the adapter is in the merged model


def test_bora_layers_wrap_the_quantized_layers_with_float32_factors(inputs):
    config = BoraConfig(r=4, bora_blocks=2, target_modules=TARGETS)
    model = add_bora(quantized.load_quantized(inputs[0], load_in_4bit=True, dtype=torch.bfloat16, device=CPU), config)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.base_layer.compute_dtype == torch.bfloat16
    state = layer.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization (the absmax quantized too)
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.bora_sigma)} == {torch.float32}
    model = add_bora(quantized.load_quantized(inputs[0], load_in_4bit=False, dtype=None, device=CPU), config)
    assert type(model.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear8bitLt"


def test_a_saved_4bit_model_is_refused_by_merge_with_the_hint(tmp_path, inputs):
    four_bit(inputs[0]).save_pretrained(tmp_path / "base-4bit")
    model = build_model("llama")
    add_bora(model, BoraConfig(r=4, bora_blocks=2, target_modules=["q_proj"]))
    save_bora(model, tmp_path / "adapter")
    result = run("merge", tmp_path / "adapter", "--base", tmp_path / "base-4bit", "--out", tmp_path / "merged")
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"Error: {tmp_path / 'base-4bit'}: a quantized model (bitsandbytes); an adapter merges into full-precision "
        f"weights (give the full-precision base the quantized one was made from (the adapter's "
        f"base_model_name_or_path))"]
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case,expected", [
    ("both", "Error: train: --load-in-4bit and --load-in-8bit together: choose one"),
    ("missing", "Error: --load-in-4bit needs bitsandbytes, which is not installed "
                "(pip install 'bora-tools[qlora]' (bitsandbytes))"),
])
def test_bad_quantization_options_get_one_line(tmp_path, inputs, monkeypatch, case, expected):
    flags = ["--load-in-4bit", "--load-in-8bit"] if case == "both" else ["--load-in-4bit"]
    if case == "missing":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    base, data = inputs
    result = run("train", "--base", base, "--data", data, "--out", tmp_path / "out", *flags)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [expected]
    assert list(tmp_path.iterdir()) == []


def test_fsdp_with_a_quantized_base_is_refused(tmp_path, inputs, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before any process group is needed
    base, data = inputs
    result = run("train", "--base", base, "--data", data, "--out", tmp_path / "out", "--fsdp", "--load-in-4bit")
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: --fsdp with a 4-bit/8-bit base (--load-in-4bit, --load-in-8bit) is not "
                                    "supported"), result.stderr
    assert list(tmp_path.iterdir()) == []
