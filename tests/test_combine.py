"""combine: the exact sum as BoRA (merged, it is merge A B), as a PEFT LoRA (exact, and Eckart-Young optimal
when truncated), against PEFT's own concatenation; and the refusals of several inputs, one line each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_support import ST, clean_failure, config, run, tensors
from safetensors.torch import load_file
from test_merge_many import (
    ATOL_LOGITS,
    ATOL_WEIGHTS,
    IDS,
    base_weights,
    boras,
    logits,
    peft_lora,
    reference_deltas,
)

from bora_tools.combine import combine_adapters
from bora_tools.core.adapter import load_adapter
from bora_tools.merge import merge_adapter


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


def _peft_logits(base: Path, lora: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), lora).eval()
    with torch.no_grad():
        return model(IDS).logits.float()


def _close(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
def test_combine_to_bora_then_merge_is_merge_a_b(tiny, tmp_path, llama_sharded):
    inputs = boras(tiny, "llama")  # b 2 and 4, different r, rank/alpha patterns, rsLoRA
    partial = tiny.adapter("llama", randomize=4, r=2, bora_blocks=1, target_modules=["v_proj", "up_proj"]).path
    inputs.append(partial)  # a module adapted by only some inputs, another target set
    weights = [1.0, -0.7, 2.0]
    report = combine_adapters(inputs, tmp_path / "sum", weights=weights)
    assert report.to == "bora" and report.bora_blocks == 4
    combined = load_adapter(tmp_path / "sum")
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert combined.modules[q].r == 4 + 3 and combined.modules[v].r == 4 + 2 + 2  # sum of the inputs' ranks
    assert combined.config.lora_alpha == combined.config.r and combined.modules[q].scaling == 1.0
    merge_adapter(tmp_path / "sum", llama_sharded, tmp_path / "via-combine")
    merge_adapter(inputs, llama_sharded, tmp_path / "direct", weights=weights)
    assert _close(base_weights(tmp_path / "via-combine"), base_weights(tmp_path / "direct")) < ATOL_WEIGHTS
    assert (logits(tmp_path / "via-combine") - logits(tmp_path / "direct")).abs().max() < ATOL_LOGITS


@pytest.mark.slow
def test_combine_to_lora_full_loads_in_peft_and_agrees_with_peft_cat(tiny, tmp_path, lora_root, llama_sharded):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = boras(tiny, "llama")
    weights = [0.8, -1.3]
    result = run("combine", *inputs, "--weights", "0.8,-1.3", "--to", "lora", "--rank", "full",
                 "--out", tmp_path / "lora", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    q = "model.layers.0.self_attn.q_proj"
    assert report["ranks"][q] == 2 * 4 + 4 * 3  # sum_k b_k r_k
    merge_adapter(inputs, llama_sharded, tmp_path / "direct", weights=weights)
    got = _peft_logits(llama_sharded, tmp_path / "lora")
    assert (got - logits(tmp_path / "direct")).abs().max() < ATOL_LOGITS
    # PEFT's own exact concatenation of the two adapters, each converted by to-lora
    for k, path in enumerate(inputs):
        assert run("to-lora", path, "--out", tmp_path / f"single{k}", "--quiet").exit_code == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_sharded, dtype=torch.float32),
                                      tmp_path / "single0", adapter_name="a")
    model.load_adapter(tmp_path / "single1", adapter_name="b")
    model.add_weighted_adapter(["a", "b"], weights, adapter_name="cat", combination_type="cat")
    model.set_adapter("cat")
    with torch.no_grad():
        peft_cat = model.eval()(IDS).logits.float()
    assert (peft_cat - got).abs().max() < ATOL_LOGITS


@pytest.mark.slow
def test_combine_to_lora_rank_k_reaches_the_eckart_young_optimum(tiny, tmp_path, lora_root):
    inputs = [*boras(tiny, "llama"), peft_lora(lora_root, "llama")]
    weights = [1.0, -0.5, 0.7]
    report = combine_adapters(inputs, tmp_path / "lora", weights=weights, to="lora", rank=5)
    lora = load_file(tmp_path / "lora" / ST)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 5 and not cfg["use_rslora"]
    per_adapter = [reference_deltas(p) for p in inputs]
    for result in report.modules:
        total = sum(w * d[result.name] for w, d in zip(weights, per_adapter))
        key = "base_model.model." + result.name
        approx = lora[key + ".lora_B.weight"].double() @ lora[key + ".lora_A.weight"].double()
        s = torch.linalg.svdvals(total)
        optimum = float((s[5:] ** 2).sum().sqrt())
        assert float((total - approx).norm()) / optimum == pytest.approx(1.0, abs=1e-4), result.name
        assert result.rel_error == pytest.approx(optimum / float(total.norm()), rel=1e-6)


# -- refusals: one line each, nothing written ---------------------------------------------------------------


def _second(work: dict, src: Path, name: str = "adapter2") -> Path:
    work[name] = Path(shutil.copytree(src, work["outdir"].parent / name))
    return work[name]


def _merge(work, *adapters, extra=()):
    return ["merge", *adapters, "--base", work["base"], "--out", work["outdir"] / "merged", *extra]


def test_mismatched_bases(work, pristine):
    other = _second(work, pristine["other"])
    clean_failure(work, _merge(work, work["adapter"], other), str(other), "another base model")
    clean_failure(work, ["combine", work["adapter"], other, "--out", work["outdir"] / "c"], "shape")


@pytest.mark.parametrize("extra,words", [
    (["--weights", "1"], "--weights: 1 weight(s) for 2"),
    (["--weights", "nan,1"], "--weights"),
    (["--weights", "1,inf"], "--weights"),
    (["--method", "ties", "--density", "0"], "--density"),
    (["--method", "ties", "--density", "1.5"], "--density"),
    (["--method", "dare_ties", "--density", "0.5,0.5,0.5"], "--density: 3 values for 2"),
])
def test_bad_weights_and_density(work, extra, words):
    second = _second(work, work["adapter"])
    clean_failure(work, _merge(work, work["adapter"], second, extra=extra), words)


def test_bad_weights_to_combine(work):
    second = _second(work, work["adapter"])
    clean_failure(work, ["combine", work["adapter"], second, "--weights", "1,nan", "--out", work["outdir"] / "c"],
                  "--weights")
    clean_failure(work, ["combine", work["adapter"], second, "--method", "ties", "--out", work["outdir"] / "c"],
                  "--method ties", "not low rank", "merge --method")


def _to_dora(lora: Path) -> None:
    config(lambda c: c.update(use_dora=True))(lora)


def test_dora_and_lora_bias_are_refused(work, tiny, lora_root):
    lora = _second(work, peft_lora(lora_root, "llama"), "dora")
    _to_dora(lora)
    clean_failure(work, _merge(work, work["adapter"], lora), "use_dora", "DoRA")
    clean_failure(work, ["combine", lora, work["adapter"], "--out", work["outdir"] / "c"], "use_dora")
    biased = _second(work, peft_lora(lora_root, "llama"), "biased")
    config(lambda c: c.update(bias="lora_only"))(biased)
    clean_failure(work, _merge(work, work["adapter"], biased), "bias 'lora_only'")
    other = _second(work, peft_lora(lora_root, "llama"), "ia3")
    config(lambda c: c.update(peft_type="IA3"))(other)
    clean_failure(work, _merge(work, work["adapter"], other), "IA3")


def test_block_grids_that_do_not_divide(work, tiny):
    kw = dict(model_kwargs=dict(hidden=48, intermediate=96), randomize=1)
    two = _second(work, tiny.adapter("llama", r=2, bora_blocks=2, **kw).path, "b2")
    three = _second(work, tiny.adapter("llama", r=2, bora_blocks=3, **kw).path, "b3")
    clean_failure(work, ["combine", two, three, "--to", "bora", "--out", work["outdir"] / "c"],
                  "bora_blocks 2 and 3 do not divide", "--to lora")
    # the default is then a LoRA, exact
    assert run("combine", two, three, "--out", work["outdir"] / "c", "--quiet").exit_code == 0
    assert json.loads((work["outdir"] / "c" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_conflicting_modules_to_save(work):
    second = _second(work, work["adapter"])
    for path, value in ((work["adapter"], 1.1), (second, 1.2)):
        config(lambda c: c.update(modules_to_save=["norm"]))(path)
        tensors(lambda t, v=value: t.update({"base_model.model.model.norm.weight": torch.full((64,), v)}))(path)
    clean_failure(work, _merge(work, work["adapter"], second), "model.norm.weight", "modules_to_save differs")
    clean_failure(work, ["combine", work["adapter"], second, "--out", work["outdir"] / "c"], "modules_to_save")
    # identical ones are carried once
    tensors(lambda t: t.update({"base_model.model.model.norm.weight": torch.full((64,), 1.1)}))(second)
    assert run("combine", work["adapter"], second, "--out", work["outdir"] / "c", "--quiet").exit_code == 0
    assert torch.equal(load_adapter(work["outdir"] / "c").saved["model.norm.weight"], torch.full((64,), 1.1))
