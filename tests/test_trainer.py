"""A model prepared with add_bora, handed to a plain transformers.Trainer: adapter-only checkpoints that resume."""

import json
import struct

import pytest
import torch

from bora_tools.core.adapter import load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets
from bora_tools.training import add_bora, bora_adapter, bora_modules, load_bora, trainable_parameters
from bora_tools.training.sft import _checkpointing_argument

pytest.importorskip("accelerate")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only contend on a shared machine
    yield
    torch.set_num_threads(before)


def dataset(n=8, length=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 300, (n, length), generator=gen).tolist()]


def prepared(seed=0, **cfg):
    torch.manual_seed(seed)
    config = BoraConfig(**{"r": 4, "bora_blocks": 2, "lora_alpha": 8, "target_modules": default_targets("llama"),
                           **cfg})
    return add_bora(build_model("llama"), config)


def trainer_for(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2, save_steps=3,
                save_strategy="steps", logging_steps=1, use_cpu=True, report_to="none", disable_tqdm=True, seed=0)
    return Trainer(model=model, args=TrainingArguments(**{**args, **kw}), train_dataset=dataset())


def adapter_tensors(model):
    return {k: v.clone() for k, v in bora_adapter(model).state_dict().items()}


@pytest.mark.slow
def test_checkpoints_are_adapters_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    model = prepared()
    trainer_for(model, tmp_path / "run").train()
    full = adapter_tensors(model)
    ckpt = tmp_path / "run" / "checkpoint-3"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}  # no frozen base in a checkpoint
    # The safetensors file is the adapter's float32 tensors plus its header, nothing more.
    raw = (ckpt / "adapter_model.safetensors").read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    adapter_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if p.requires_grad)
    assert len(raw) == 8 + header + adapter_bytes
    assert adapter_bytes < sum(p.numel() * 4 for p in model.parameters()) / 10
    loaded = load_adapter(ckpt)  # our reader accepts a checkpoint as an adapter
    assert set(loaded.modules) == set(bora_modules(model))
    # The resume map: the model's parameter names -> the adapter file.
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == {n for n, p in model.named_parameters() if p.requires_grad}

    # A fresh run resumed from checkpoint-3 (adapter, optimizer, scheduler, step, RNG) ends where the first ended.
    resumed = prepared(seed=123)  # another initial A: everything must come from the checkpoint
    trainer = trainer_for(resumed, tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 6
    got = adapter_tensors(resumed)
    moved = max(float((full[k] - loaded_v).abs().max()) for k, loaded_v in loaded.state_dict().items())
    assert moved > 1e-3  # steps 4-6 changed the adapter, so equality below means something
    for key in full:
        torch.testing.assert_close(got[key], full[key], rtol=1e-5, atol=1e-6, msg=key)


def test_save_model_writes_the_adapter_and_it_loads_back(tmp_path):
    model = prepared()
    trainer = trainer_for(model, tmp_path / "run", max_steps=2, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()
    ids = torch.tensor([[0, 5, 17, 42, 99]])
    model.eval()
    again = load_bora(build_model("llama"), tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    plain, ckpt = prepared(), prepared()
    trainer_for(plain, tmp_path / "a", max_steps=2, save_strategy="no").train()
    from transformers import TrainingArguments

    flag = _checkpointing_argument(TrainingArguments)  # activation_checkpointing from transformers 5.24
    trainer_for(ckpt, tmp_path / "b", max_steps=2, save_strategy="no", **{flag: True}).train()
    a, b = adapter_tensors(plain), adapter_tensors(ckpt)
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3  # B moved off zero
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("arch, b, saved", [
    pytest.param("llama", 1, None, id="llama-b1"),  # BoRA is LoRA plus one sigma entry per rank per module
    pytest.param("llama", 2, None, id="llama-b2"),
    pytest.param("gpt2", 2, None, id="gpt2-conv1d"),  # fan_in_fan_out
    pytest.param("qwen2", 2, ["lm_head"], id="qwen2-saved-tied-lm_head",  # a trainable copy next to the frozen one
                 marks=pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")),
])
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_trainable_parameters_counts_like_peft(capsys, arch, b, saved):
    """PEFT's own count on the same tiny model: a LoRA of the same r, targets and modules_to_save.

    On the PEFT model itself, ``trainable_parameters`` gives PEFT's ``get_nb_trainable_parameters()``
    and prints the line ``print_trainable_parameters()`` prints. The BoRA model adapts the same modules
    and counts PEFT's numbers plus its ``b*b*r`` sigma entries per module, in trainable and in total.
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    r, targets = 4, default_targets(arch)
    lora = get_peft_model(build_model(arch), LoraConfig(r=r, lora_alpha=8, target_modules=targets,
                                                        modules_to_save=saved, fan_in_fan_out=arch == "gpt2"))
    peft_trainable, peft_total = lora.get_nb_trainable_parameters()
    capsys.readouterr()
    lora.print_trainable_parameters()
    peft_line = capsys.readouterr().out.strip()
    ours = trainable_parameters(lora)
    assert (ours.trainable, ours.total) == (peft_trainable, peft_total)
    assert str(ours) == peft_line

    bora = add_bora(build_model(arch), BoraConfig(r=r, bora_blocks=b, lora_alpha=8, target_modules=targets,
                                                  modules_to_save=saved))
    adapted = {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if isinstance(m, LoraLayer)}
    assert set(bora_modules(bora)) == adapted and adapted
    sigma = len(adapted) * b * b * r
    summary = trainable_parameters(bora)
    assert (summary.trainable, summary.total) == (peft_trainable + sigma, peft_total + sigma)
    assert str(summary) == (f"trainable params: {peft_trainable + sigma:,d} || all params: {peft_total + sigma:,d} "
                            f"|| trainable%: {100 * (peft_trainable + sigma) / (peft_total + sigma):.4f}")
