"""merge A B ... (linear and the task-arithmetic family) against float64 references built here, in transformers.

The reference of every merge is ``W + sum_k w_k dW_k`` in float64, each ``dW_k`` read from the adapter's
files with nothing from bora_tools: the block loop of docs/format.md for BoRA, ``s * B @ A`` with PEFT's
scaling rules for LoRA. TIES/DARE references follow mergekit's definitions (generalized_task_arithmetic).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from cli_support import run
from safetensors.torch import load_file

from bora_tools.core.task_arithmetic import module_seed, sparsify
from bora_tools.errors import ShapeError, ValidationError
from bora_tools.merge import merge_adapter

ATOL_LOGITS = 1e-4  # what the one-adapter merge meets (test_merge.py)
ATOL_WEIGHTS = 1e-5
IDS = torch.tensor([[0, 17, 42, 99, 3, 250, 7, 64, 128, 5]])


# -- inputs: BoRA adapters from the session store, PEFT LoRA adapters made here with peft -----------------


def _targets(arch: str) -> tuple[str, str]:
    """A module name to give a rank pattern and one to give an alpha pattern."""
    return ("c_attn", "c_fc") if arch == "gpt2" else ("q_proj", "down_proj")


def boras(tiny, arch: str) -> list[Path]:
    """Two BoRA adapters on the tiny ``arch``: different r, b 2 and 4, rank/alpha patterns, rsLoRA."""
    fifo = {"fan_in_fan_out": arch == "gpt2"}
    rank_key, alpha_key = _targets(arch)
    a = tiny.adapter(arch, randomize=1, r=4, bora_blocks=2, lora_alpha=8, use_rslora=True, **fifo)
    b = tiny.adapter(arch, randomize=2, r=2, bora_blocks=4, lora_alpha=4, rank_pattern={rank_key: 3},
                     alpha_pattern={alpha_key: 3.0}, **fifo)
    return [a.path, b.path]


_LORAS: dict[tuple, Path] = {}


def peft_lora(tmp_root: Path, arch: str, *, seed: int = 3, **cfg) -> Path:
    """A PEFT LoRA adapter (non-zero B) saved by peft itself on ``build_model(arch, seed=0)``."""
    key = (arch, seed, repr(sorted(cfg.items())))
    if key not in _LORAS:
        from peft import LoraConfig, get_peft_model

        from bora_tools.demo.tiny import build_model, default_targets

        rank_key, alpha_key = _targets(arch)
        config = {"r": 4, "lora_alpha": 6, "target_modules": default_targets(arch), "use_rslora": True,
                  "rank_pattern": {rank_key: 2}, "alpha_pattern": {alpha_key: 5.0},
                  "fan_in_fan_out": arch == "gpt2", **cfg}
        with torch.random.fork_rng(devices=[]):
            model = get_peft_model(build_model(arch, seed=0), LoraConfig(**config))
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        path = tmp_root / f"lora-{arch}-{len(_LORAS)}"
        model.save_pretrained(path)
        _LORAS[key] = path
    return _LORAS[key]


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


# -- the float64 reference, read from the files -------------------------------------------------------------


def _match(patterns: dict, name: str):
    return next((v for k, v in patterns.items() if name == k or name.endswith("." + k)), None)


def reference_deltas(path: Path) -> dict[str, torch.Tensor]:
    """``{module: dW}`` float64 ``(m, n)`` of an adapter directory, from its config and tensors only."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    tensors = {k: v.double() for k, v in load_file(path / "adapter_model.safetensors").items()}
    out = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        A, B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        r = _match(cfg.get("rank_pattern") or {}, name) or cfg["r"]
        alpha = _match(cfg.get("alpha_pattern") or {}, name) or cfg["lora_alpha"]
        s = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        assert A.shape[0] == r
        if cfg["peft_type"] == "LORA":
            out[name] = s * B @ A
            continue
        sigma, b = tensors[key.replace(".lora_A.weight", ".bora_sigma")], cfg["bora_blocks"]
        (m, n), dw = (B.shape[0], A.shape[1]), torch.zeros(B.shape[0], A.shape[1], dtype=torch.float64)
        mb, nb = m // b, n // b
        for i in range(b):
            for j in range(b):  # block (i, j) = s * B_i diag(sigma[i, j]) A_j
                dw[i * mb:(i + 1) * mb, j * nb:(j + 1) * nb] = \
                    s * B[i * mb:(i + 1) * mb] @ torch.diag(sigma[i, j]) @ A[:, j * nb:(j + 1) * nb]
        out[name] = dw
    return out


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(base.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference_merge(base: Path, adapters: list[Path], weights: list[float], *, fifo: bool) -> dict:
    """``W + sum_k w_k dW_k`` in float64 for every weight (others as they are)."""
    state = {k: v.double() for k, v in base_weights(base).items()}
    for path, w in zip(adapters, weights):
        for name, dw in reference_deltas(path).items():
            state[name + ".weight"] += w * (dw.T if fifo else dw)
    return state


def merged_weights(out: Path) -> dict[str, torch.Tensor]:
    return base_weights(out)


def logits(path_or_model, state: dict | None = None) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        model.tie_weights()
    with torch.no_grad():
        return model(IDS).logits.float()


def digest(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


# -- linear -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_linear_merge_of_bora_and_lora_inputs_meets_the_float64_reference(tiny, tmp_path, lora_root, arch):
    inputs = [*boras(tiny, arch), peft_lora(lora_root, arch)]
    weights = [1.0, -0.7, 0.5]
    base = tiny.base(arch, max_shard_size="40KB")
    report = merge_adapter(inputs, base, tmp_path / "out", weights=weights)
    ref = reference_merge(base, inputs, weights, fifo=arch == "gpt2")
    got = merged_weights(tmp_path / "out")
    assert set(got) == set(ref)
    worst = max(float((got[k].double() - ref[k]).abs().max()) for k in ref)
    assert worst < ATOL_WEIGHTS, worst
    expected, merged, plain = logits(base, ref), logits(tmp_path / "out"), logits(base)
    assert (expected - plain).abs().max() > 0.1  # the merge visibly changes the output
    assert (merged - expected).abs().max() < ATOL_LOGITS
    assert report.adapters == 3 and report.merged == len(reference_deltas(inputs[0]))
    # every adapter contributes: dropping one is far off
    assert (logits(base, reference_merge(base, inputs[:2], weights[:2], fifo=arch == "gpt2")) - merged
            ).abs().max() > 10 * ATOL_LOGITS


def test_one_adapter_is_todays_merge_byte_for_byte(tiny, tmp_path, llama_sharded):
    adapter = tiny.adapter("llama", randomize=1, r=4, bora_blocks=2, lora_alpha=8).path
    merge_adapter(adapter, llama_sharded, tmp_path / "one")
    assert run("merge", adapter, "--base", llama_sharded, "--out", tmp_path / "cli", "--quiet").exit_code == 0
    merge_adapter([adapter], llama_sharded, tmp_path / "listed")
    # through the several-adapter path (a one-term weighted sum): the same arithmetic, the same bytes
    merge_adapter([adapter], llama_sharded, tmp_path / "summed", weights=[1.0])
    one = digest(tmp_path / "one")
    assert "README.md" not in one and "bora_tools_recipe" not in (tmp_path / "one" / "config.json").read_text()
    assert digest(tmp_path / "cli") == digest(tmp_path / "listed") == one
    assert {k: v for k, v in digest(tmp_path / "summed").items() if k.endswith(".safetensors")} == \
        {k: v for k, v in one.items() if k.endswith(".safetensors")}


@pytest.mark.slow
def test_a_lora_alone_merges_like_peft(tiny, tmp_path, lora_root, llama_sharded):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = peft_lora(lora_root, "llama")
    assert run("merge", lora, "--base", llama_sharded, "--out", tmp_path / "out", "--quiet").exit_code == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_sharded, dtype=torch.float32),
                                      lora).eval()
    with torch.no_grad():
        want = model(IDS).logits.float()
    assert (logits(tmp_path / "out") - want).abs().max() < ATOL_LOGITS


def test_the_recipe_is_recorded(tiny, tmp_path, lora_root, llama_sharded):
    inputs = [*boras(tiny, "llama"), peft_lora(lora_root, "llama")]
    result = run("merge", *inputs, "--base", llama_sharded, "--out", tmp_path / "out", "--weights", "1,-0.5,2",
                 "--method", "dare_ties", "--density", "0.5,0.6,0.7", "--seed", "7", "--json")
    assert result.exit_code == 0, result.output
    rec = json.loads((tmp_path / "out" / "config.json").read_text())["bora_tools_recipe"]
    assert rec["method"] == "dare_ties" and rec["seed"] == 7 and rec["command"] == "merge"
    assert [a["adapter"] for a in rec["adapters"]] == [str(p) for p in inputs]
    assert [a["weight"] for a in rec["adapters"]] == [1.0, -0.5, 2.0]
    assert [a["density"] for a in rec["adapters"]] == [0.5, 0.6, 0.7]
    assert [a["kind"] for a in rec["adapters"]] == ["bora", "bora", "lora"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "--method dare_ties --density 0.5,0.6,0.7 --seed 7" in card and str(inputs[2]) in card
    report = json.loads(result.stdout)
    assert report["recipe"] == rec and report["module_bytes"] > 0


# -- the task-arithmetic family ---------------------------------------------------------------------------


def mergekit_reference(deltas: list[torch.Tensor], weights: list[float], density: float, method: str,
                       masks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """mergekit's generalized task arithmetic: sparsify each task vector, weight, (elect signs,) sum."""
    kept = []
    for k, d in enumerate(deltas):
        if density >= 1:
            kept.append(d)
        elif method in ("ties", "magnitude_prune"):  # mergekit `magnitude`: the top int(density * numel)
            top = torch.argsort(d.abs().reshape(-1), descending=True)[: int(density * d.numel())]
            mask = torch.zeros(d.numel(), dtype=d.dtype)
            mask[top] = 1
            kept.append(d * mask.reshape(d.shape))
        else:  # mergekit `bernoulli` with rescale
            kept.append(d * masks[k] / density)
    weighted = torch.stack(kept) * torch.tensor(weights, dtype=deltas[0].dtype).reshape(-1, 1, 1)
    if method in ("ties", "dare_ties"):
        majority = (weighted.sum(0) >= 0).to(weighted.dtype) * 2 - 1
        mask = (weighted.sign() == majority).to(weighted.dtype)
        divisor = (torch.tensor(weights, dtype=weighted.dtype).reshape(-1, 1, 1) * mask).sum(0)
        divisor[divisor.abs() < 1e-8] = 1
        return (weighted * mask).sum(0) / divisor
    return weighted.sum(0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_task_methods_meet_mergekits_definitions(tiny, tmp_path, lora_root, llama_sharded, method):
    inputs = [*boras(tiny, "llama"), peft_lora(lora_root, "llama")]
    weights, density, seed = [1.0, -0.6, 0.8], 0.4, 11
    report = merge_adapter(inputs, llama_sharded, tmp_path / "out", weights=weights, method=method,
                           density=density, seed=seed)
    per_adapter = [reference_deltas(p) for p in inputs]
    base, got = base_weights(llama_sharded), merged_weights(tmp_path / "out")
    for name in per_adapter[0]:
        deltas = [d[name].float() for d in per_adapter]  # the task vectors in the precision merge uses
        gen = torch.Generator().manual_seed(module_seed(seed, name))
        masks = [(torch.rand(d.shape, generator=gen) < density).float() for d in deltas]
        want = base[name + ".weight"].double() + mergekit_reference([d.double() for d in deltas], weights, density,
                                                                    method, [m.double() for m in masks])
        assert float((got[name + ".weight"].double() - want).abs().max()) < ATOL_WEIGHTS, name
    m, n = max((d.shape for d in per_adapter[0].values()), key=lambda s: s[0] * s[1])
    assert report.module_bytes == ((3 + 3) * 4 + 3) * m * n


def test_dare_with_density_one_is_linear_and_a_seed_is_reproducible(tiny, tmp_path, llama_sharded):
    inputs = boras(tiny, "llama")
    merge_adapter(inputs, llama_sharded, tmp_path / "linear", weights=[1.0, 0.5])
    merge_adapter(inputs, llama_sharded, tmp_path / "dare1", weights=[1.0, 0.5], method="dare_linear", density=1.0)
    linear, dare1 = merged_weights(tmp_path / "linear"), merged_weights(tmp_path / "dare1")
    assert max(float((linear[k] - dare1[k]).abs().max()) for k in linear) < ATOL_WEIGHTS
    for seed, out in ((5, "a"), (5, "b"), (6, "c")):
        merge_adapter(inputs, llama_sharded, tmp_path / out, method="dare_ties", density=0.3, seed=seed)
    shards = lambda d: {k: v for k, v in digest(tmp_path / d).items() if k.endswith(".safetensors")}  # noqa: E731
    assert shards("a") == shards("b") != shards("c")


@pytest.mark.parametrize("method", ["dare_linear", "ties"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_the_kept_fraction_matches_density(method, density):
    delta = torch.randn(300, 400, generator=torch.Generator().manual_seed(0))
    kept = sparsify(delta.clone(), density, method, torch.Generator().manual_seed(1))
    fraction = float((kept != 0).float().mean())
    if method == "ties":
        assert (kept != 0).sum() == int(density * delta.numel())
    else:
        assert abs(fraction - density) < 0.01
        assert torch.allclose(kept[kept != 0], delta[kept != 0] / density)


# -- refusals (the library; the CLI lines are in test_bad_inputs.py) ----------------------------------------


def test_library_refusals_name_the_parameter(tiny, tmp_path, llama_sharded):
    inputs = boras(tiny, "llama")
    cases = [(dict(weights=[1.0]), "`weights`: 1 weight(s) for 2"), (dict(weights=[1.0, math.nan]), "`weights`"),
             (dict(method="ties", density=0.0), "`density`"), (dict(method="ties", density=[0.5, 1.5]), "`density`"),
             (dict(density=0.5), "`density` applies"), (dict(method="slerp"), "`method`")]
    for kwargs, words in cases:
        with pytest.raises(ValidationError, match=words.replace("(", r"\(").replace(")", r"\)")):
            merge_adapter(inputs, llama_sharded, tmp_path / "out", **kwargs)
    other = tiny.adapter("llama", model_kwargs=dict(hidden=32, intermediate=64), r=4, bora_blocks=2).path
    with pytest.raises(ShapeError, match="another base model"):
        merge_adapter([inputs[0], other], llama_sharded, tmp_path / "out")
    assert not (tmp_path / "out").exists()
