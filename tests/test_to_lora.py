"""bora-tools to-lora: every output proven in PEFT (``PeftModel.from_pretrained``) against the BoRA
model's logits and against dense float64 SVDs of ``dW``; every refusal leaves nothing behind."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from cli_support import run
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

from bora_tools.conversion import pattern_keys, to_lora
from bora_tools.core.adapter import PREFIX, WEIGHTS_NAME, load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.core.factors import factored_svd, gram_svd
from bora_tools.core.lowrank import RankPolicy, balanced_exact_factors, energy_rank
from bora_tools.demo.tiny import build_model
from bora_tools.errors import OutputExistsError, OutputWriteError, ValidationError

ATOL_LOGITS = 1e-4
IDS = torch.tensor([[0, 17, 42, 99, 3, 250, 7, 64, 128, 5]])

# llama: modules_to_save carried over; qwen2: rank_pattern, alpha_pattern, rsLoRA (so b*r differs per
# module); gpt2: Conv1D with fan_in_fan_out.
CASES = {
    "llama": dict(r=4, bora_blocks=4, lora_alpha=8, modules_to_save=["lm_head"]),
    "qwen2": dict(r=4, bora_blocks=2, lora_alpha=6, use_rslora=True,
                  rank_pattern={"q_proj": 8, r"model\.layers\.1\.mlp\.down_proj": 2}, alpha_pattern={"v_proj": 3.0}),
    "gpt2": dict(r=4, bora_blocks=4, lora_alpha=8),
}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _perturb_saved_lm_head(model):
    with torch.no_grad():
        model.lm_head.module.weight.add_(0.05 * torch.randn_like(model.lm_head.module.weight))


def _make(tiny, arch: str, *, randomize: bool = True, **overrides) -> dict:
    """A BoRA adapter on a tiny ``arch`` model, saved (shared: read only), with the BoRA and base logits."""
    config = {**CASES[arch], "task_type": "CAUSAL_LM", **overrides}
    # modules_to_save: make the saved copy differ from the base, so loading it matters
    made = tiny.adapter(arch, randomize=1 if randomize else None,
                        edit=_perturb_saved_lm_head if config.get("modules_to_save") else None, **config)
    return {"arch": arch, "path": made.path, "bora_logits": made.logits(IDS), "base_logits": made.base_logits(IDS),
            "adapter": load_adapter(made.path)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny) -> dict:
    return _make(tiny, request.param)


@pytest.fixture(scope="module")
def llama(tiny) -> dict:
    return _make(tiny, "llama")


@pytest.fixture(scope="module")
def qwen2(tiny) -> dict:
    return _make(tiny, "qwen2")


def _peft(arch: str, out: Path):
    return PeftModel.from_pretrained(build_model(arch, seed=0), str(out)).eval()


def _lora_layers(peft_model) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers by the base model's module name."""
    root = peft_model.base_model.model
    return {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer)}


def _peft_delta(layer: LoraLayer) -> torch.Tensor:
    """The update PEFT applies, ``scaling * lora_B @ lora_A``, as (out, in) float64."""
    a = layer.lora_A["default"].weight.double()
    b = layer.lora_B["default"].weight.double()
    return layer.scaling["default"] * (b @ a)


def _dense_dw(mod) -> torch.Tensor:
    """``dW`` from docs/format.md, section 1, block by block in float64 (independent of core.factors)."""
    A, B, sigma = mod.A.double(), mod.B.double(), mod.sigma.double()
    b, m, n = mod.b, *mod.shape
    rows = []
    for i in range(b):
        b_i = B[i * m // b:(i + 1) * m // b]
        rows.append(torch.cat([b_i @ torch.diag(sigma[i, j]) @ A[:, j * n // b:(j + 1) * n // b] for j in range(b)], 1))
    return mod.scaling * torch.cat(rows, 0)


def _no_leftovers(path: Path) -> bool:
    return not path.exists() and not list(path.parent.glob(f".{path.name}.bora-tmp-*"))


# -- the exact form -----------------------------------------------------------------------------

@pytest.mark.slow
def test_exact_form_in_peft_gives_the_bora_logits(case, tmp_path):
    out = tmp_path / "lora"
    report = to_lora(case["path"], out, rank="full").to_dict()
    assert (case["bora_logits"] - case["base_logits"]).abs().max() > 0.1  # the adapter matters
    peft_model = _peft(case["arch"], out)
    assert (_logits(peft_model) - case["bora_logits"]).abs().max() <= ATOL_LOGITS
    layers = _lora_layers(peft_model)
    assert set(layers) == set(case["adapter"].modules)
    for name, mod in case["adapter"].modules.items():
        assert layers[name].r["default"] == mod.b * mod.r  # exact form: rank b*r
        assert layers[name].scaling["default"] == 1.0  # the BoRA scaling is folded in
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["fan_in_fan_out"] is (case["arch"] == "gpt2")
    assert report["totals"]["max_rel_error"] == 0.0


def test_modules_to_save_are_carried_into_peft(llama, tmp_path):
    to_lora(llama["path"], tmp_path / "lora", rank="full")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    peft_model = _peft("llama", tmp_path / "lora")
    head = peft_model.base_model.model.lm_head
    saved = llama["adapter"].saved["lm_head.weight"]
    assert torch.equal(head.modules_to_save["default"].weight, saved)
    assert not torch.equal(head.original_module.weight, saved)


def test_qwen2_patterns_become_per_module_ranks_with_keys_matching_one_module(qwen2, tmp_path):
    to_lora(qwen2["path"], tmp_path / "lora", rank="full")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    names = [n for n, _ in build_model("qwen2").named_modules()]
    for key in cfg["rank_pattern"]:  # PEFT's rule, over every module of the base model
        assert len([n for n in names if re.match(rf"(.*\.)?({key})$", n)]) == 1, key
    layers = _lora_layers(_peft("qwen2", tmp_path / "lora"))
    expected = {"model.layers.0.self_attn.q_proj": 16, "model.layers.1.mlp.down_proj": 4,
                "model.layers.0.mlp.up_proj": 8}
    for name, rank in expected.items():
        assert layers[name].r["default"] == rank


def test_pattern_keys_anchor_names_that_are_suffixes_of_others():
    keys = pattern_keys(["q_proj", "model.q_proj", "model.layers.0.mlp.up_proj"])
    assert keys["model.layers.0.mlp.up_proj"] == r"model\.layers\.0\.mlp\.up_proj"
    for name, key in keys.items():
        assert [n for n in keys if re.match(rf"(.*\.)?({key})$", n)] == [name]


def test_balanced_exact_factors_are_exact_and_balanced():
    gen = torch.Generator().manual_seed(0)
    A, B, sigma = (
        torch.randn(3, 8, generator=gen),
        1e-3 * torch.randn(12, 3, generator=gen),
        torch.randn(2, 2, 3, generator=gen),
    )
    b2, a2 = balanced_exact_factors(A, B, sigma, 2.5)
    mod = type("M", (), {"A": A, "B": B, "sigma": sigma, "scaling": 2.5, "b": 2, "shape": (12, 8)})
    assert torch.allclose(b2 @ a2, _dense_dw(mod), rtol=0, atol=1e-15)
    assert torch.allclose(b2.norm(dim=0), a2.norm(dim=1), rtol=1e-12)


@pytest.mark.parametrize("dtype, atol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_exact_form_loads_in_peft(llama, tmp_path, dtype, atol):
    to_lora(llama["path"], tmp_path / "lora", rank="full", dtype=dtype)
    tensors = load_file(tmp_path / "lora" / WEIGHTS_NAME)
    assert {str(t.dtype) for k, t in tensors.items() if "lora_" in k} == {f"torch.{dtype}"}
    assert (_logits(_peft("llama", tmp_path / "lora")) - llama["bora_logits"]).abs().max() <= atol


# -- truncation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, route", [(1, "gram"), (3, "gram"), (3, "qr")])
def test_truncation_is_the_optimum_of_a_dense_svd_in_peft(case, tmp_path, rank, route):
    out = tmp_path / "lora"
    report = to_lora(case["path"], out, rank=rank, route=route).to_dict()
    layers = _lora_layers(_peft(case["arch"], out))
    by_name = {m["name"]: m for m in report["modules"]}
    for name, mod in case["adapter"].modules.items():
        dw = _dense_dw(mod)
        s = torch.linalg.svdvals(dw)
        optimum = float(s[rank:].square().sum().sqrt())
        assert layers[name].r["default"] == rank
        err = float((dw - _peft_delta(layers[name])).norm())
        assert err == pytest.approx(optimum, rel=1e-4)
        assert by_name[name]["rel_error"] == pytest.approx(optimum / float(dw.norm()), rel=1e-6)


def test_rank_above_the_update_rank_is_capped_and_lossless(llama, tmp_path, caplog):
    report = to_lora(llama["path"], tmp_path / "lora", rank=40).to_dict()  # b*r = 16 < 40
    assert all(m["rank"] == 16 and "capped at the update's rank 16" in m["note"] for m in report["modules"])
    assert "kept another rank than asked" in caplog.text
    assert (_logits(_peft("llama", tmp_path / "lora")) - llama["bora_logits"]).abs().max() <= ATOL_LOGITS


@pytest.mark.parametrize("fraction", [0.6, 0.9, 0.99])
@pytest.mark.slow
def test_energy_rank_is_minimal_against_a_dense_svd_and_loads_in_peft(qwen2, tmp_path, fraction):
    out = tmp_path / "lora"
    report = to_lora(qwen2["path"], out, energy=fraction).to_dict()
    layers = _lora_layers(_peft("qwen2", out))
    ranks = set()
    for m in report["modules"]:
        mod = qwen2["adapter"].modules[m["name"]]
        s2 = torch.linalg.svdvals(_dense_dw(mod)).square()
        cum = torch.cumsum(s2, 0) / s2.sum()
        k = m["rank"]
        assert cum[k - 1] >= fraction and (k == 1 or cum[k - 2] < fraction)  # meets the rule, minimally
        assert layers[m["name"]].r["default"] == k and layers[m["name"]].scaling["default"] == 1.0
        err = float((_dense_dw(mod) - _peft_delta(layers[m["name"]])).norm())
        assert err == pytest.approx(float(s2[k:].sum().sqrt()), rel=1e-4)
        ranks.add(k)
    assert len(ranks) > 1  # the per-module ranks really differ, so rank_pattern was exercised


def test_energy_with_a_rank_cap(qwen2, tmp_path):
    report = to_lora(qwen2["path"], tmp_path / "lora", energy=0.999, rank=2).to_dict()
    assert all(m["rank"] <= 2 for m in report["modules"])
    assert any(m["note"] and "capped by --rank 2" in m["note"] for m in report["modules"])
    assert {layer.r["default"] for layer in _lora_layers(_peft("qwen2", tmp_path / "lora")).values()} <= {1, 2}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=40).filter(lambda v: max(v) > 1e-3),
    st.floats(1e-6, 1.0),
)
def test_energy_rank_matches_brute_force(values, fraction):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    k = energy_rank(s, fraction)
    total = float((s**2).sum())
    assert float((s[:k] ** 2).sum()) >= fraction * total * (1 - 1e-12)
    assert k == 1 or float((s[: k - 1] ** 2).sum()) < fraction * total * (1 + 1e-12)


# -- the two SVD routes against a dense float64 SVD --------------------------------------------------


def _factors(kind: str, b: int, r: int, m: int, n: int):
    gen = torch.Generator().manual_seed(b * 1000 + m + n)
    A, B, sigma = (
        torch.randn(r, n, generator=gen),
        torch.randn(m, r, generator=gen),
        torch.randn(b, b, r, generator=gen),
    )
    if kind == "B zero":  # a fresh adapter
        B.zero_()
    elif kind == "one block zero":
        B[: m // b].zero_()
    elif kind == "repeated columns":
        A[1], B[:, 2] = A[0], B[:, 1]
    elif kind == "sigma row zero":
        sigma[0].zero_()
    elif kind == "ill-conditioned":
        B[:, 0] *= 1e-6
        A[1] *= 1e-5
    return A, B, sigma


@pytest.mark.parametrize("route", [gram_svd, factored_svd], ids=["gram", "qr"])
@pytest.mark.parametrize(
    "kind", ["random", "B zero", "one block zero", "repeated columns", "sigma row zero", "ill-conditioned"]
)
@pytest.mark.parametrize("b, r, m, n", [(4, 16, 256, 128), (4, 16, 32, 64), (2, 3, 12, 8), (1, 8, 40, 30)])
def test_svd_routes_match_a_dense_svd(route, kind, b, r, m, n):
    A, B, sigma = _factors(kind, b, r, m, n)
    mod = type("M", (), {"A": A, "B": B, "sigma": sigma, "scaling": 1.5, "b": b, "shape": (m, n)})
    dw = _dense_dw(mod)
    dense = torch.linalg.svdvals(dw)
    svd = route(A, B, sigma, 1.5)
    s0 = float(dense[0])
    assert svd.S.shape == (min(b * r, m, n),) and torch.isfinite(svd.U).all() and torch.isfinite(svd.Vh).all()
    if s0 == 0:
        assert not svd.S.any() and svd.rank() == 0
        return
    # The Gram route squares the condition number: documented accuracy about 1e-7 * S[0]; QR: float64 rounding.
    tol = 1e-7 if route is gram_svd else 1e-11
    assert torch.allclose(svd.S, dense[: svd.S.numel()], rtol=0, atol=tol * s0)
    assert float((svd.U * svd.S @ svd.Vh - dw).norm()) <= tol * float(dw.norm())
    kept = svd.S > 1e-6 * s0  # singular vectors are unit-norm and orthogonal where S is not rounding noise
    u = svd.U[:, kept]
    assert torch.allclose(u.T @ u, torch.eye(int(kept.sum()), dtype=torch.float64), atol=1e-6)
    k = max(1, svd.rank() // 2)
    b_k, a_k = svd.lora_factors(k, dtype=torch.float64)
    assert float((dw - b_k @ a_k).norm()) == pytest.approx(
        float(dense[k:].square().sum().sqrt()), rel=1e-6, abs=tol * s0
    )


@pytest.mark.parametrize("vectors", [0, 1, 5, 64])
def test_gram_svd_can_assemble_only_the_leading_vectors(vectors):
    A, B, sigma = _factors("random", 4, 16, 256, 128)
    whole, part = gram_svd(A, B, sigma, 1.5), gram_svd(A, B, sigma, 1.5, vectors=vectors)
    assert (
        torch.equal(part.S, whole.S)
        and part.U.shape == (256, min(vectors, 64))
        and part.Vh.shape == (min(vectors, 64), 128)
    )
    assert torch.allclose(part.U, whole.U[:, :vectors]) and torch.allclose(part.Vh, whole.Vh[:vectors])


# -- zero updates -------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["full", 2])
def test_fresh_adapter_becomes_rank_one_zero_factors_that_peft_loads(tiny, tmp_path, rank):
    fresh = _make(tiny, "gpt2", randomize=False)  # B = 0: every update is exactly zero
    report = to_lora(fresh["path"], tmp_path / "lora", rank=rank).to_dict()
    assert report["totals"]["zero_modules"] == len(report["modules"])
    assert all(m["rank"] == 1 and m["note"].startswith("zero update") for m in report["modules"])
    peft_model = _peft("gpt2", tmp_path / "lora")
    for layer in _lora_layers(peft_model).values():
        assert layer.r["default"] == 1 and not layer.lora_B["default"].weight.any()
    assert (_logits(peft_model) - fresh["base_logits"]).abs().max() == 0.0


def test_one_zero_module_among_others(tiny, tmp_path, fresh_copy):
    path = fresh_copy(_make(tiny, "llama")["path"])
    tensors = load_file(path / WEIGHTS_NAME)
    zeroed = "model.layers.1.self_attn.o_proj"
    tensors[f"{PREFIX}{zeroed}.lora_B.weight"].zero_()
    save_file(tensors, path / WEIGHTS_NAME)
    report = to_lora(path, tmp_path / "lora", rank="full").to_dict()
    assert [m["name"] for m in report["modules"] if m["update_rank"] == 0] == [zeroed]
    layers = _lora_layers(_peft("llama", tmp_path / "lora"))
    assert layers[zeroed].r["default"] == 1 and layers["model.layers.0.self_attn.o_proj"].r["default"] == 16
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and list(cfg["rank_pattern"].values()) == [1]


# -- command line, report and plot ---------------------------------------------------------------


def test_cli_json_report_file_and_table(llama, tmp_path):
    out, rep = tmp_path / "lora", tmp_path / "report.json"
    res = run("to-lora", llama["path"], "--out", out, "--rank", "3", "--report", rep, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    printed, written = json.loads(res.stdout), json.loads(rep.read_text())
    assert printed == written
    mods = llama["adapter"].modules
    assert written["totals"]["parameters_before"] == sum(m.r * sum(m.shape) + m.b**2 * m.r for m in mods.values())
    assert written["totals"]["parameters_after"] == sum(3 * sum(m.shape) for m in mods.values())
    assert written["totals"]["max_rel_error"] == max(m["rel_error"] for m in written["modules"])
    assert all(0 < m["energy"] < 1 for m in written["modules"])
    table = run("to-lora", llama["path"], "--out", out, "--rank", "3", "--overwrite")
    assert table.exit_code == 0 and all(name in table.stdout for name in mods)
    assert "relative Frobenius error: worst" in table.stdout


@pytest.mark.slow
def test_plot_writes_a_png(qwen2, tmp_path):
    png = tmp_path / "spectra.png"
    res = run("to-lora", qwen2["path"], "--out", tmp_path / "lora", "--energy", "0.9", "--plot", png, "--quiet")
    assert res.exit_code == 0, res.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_without_matplotlib_is_one_clear_error_before_any_work(llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / "lora"
    res = run("to-lora", llama["path"], "--out", out, "--rank", "2", "--plot", tmp_path / "p.png")
    assert res.exit_code == 1
    assert (
        res.stderr.strip() == "Error: --plot needs matplotlib, which is not installed (pip install 'bora-tools[plot]')"
    )
    assert _no_leftovers(out)


@pytest.mark.parametrize(
    "args",
    [
        ["--rank", "0"],
        ["--rank", "-3"],
        ["--rank", "abc"],
        ["--rank", "2.5"],
        ["--energy", "0"],
        ["--energy", "1.01"],
        ["--energy", "-0.5"],
        ["--energy", "x"],
        ["--rank", "full", "--energy", "0.5"],
    ],
)
def test_usage_errors_exit_2_and_write_nothing(llama, tmp_path, args):
    out = tmp_path / "lora"
    res = run("to-lora", llama["path"], "--out", out, *args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and _no_leftovers(out)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank=0), "`rank`: expected a positive integer or 'full', found 0"),
        (dict(rank="most"), "`rank`: expected a positive integer or 'full', found 'most'"),
        (dict(energy=1.5), "`energy`: expected a fraction in (0, 1], found 1.5"),
        (dict(rank="full", energy=0.5), "`rank` full keeps everything and cannot be combined with `energy`"),
        (dict(), "give `rank` K, `rank` full or `energy` F"),
    ],
)
def test_library_refuses_bad_policies(kwargs, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        RankPolicy.parse(**kwargs)


def test_refusals_are_one_line_and_leave_nothing(llama, tmp_path):
    out = tmp_path / "lora"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    cases = [
        ([str(bad), "--out", str(out), "--rank", "2"], "adapter_config.json: not valid JSON"),
        (
            [str(llama["path"]), "--out", str(llama["path"]), "--rank", "2", "--overwrite"],
            "is, contains or lies inside the input",
        ),
        (
            [str(llama["path"]), "--out", str(llama["path"].parent), "--rank", "2", "--overwrite"],
            "is, contains or lies inside the input",
        ),
        (
            [str(llama["path"]), "--out", str(out), "--rank", "2", "--report", str(out / "r.json")],
            "inside the LoRA adapter",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(llama["path"]), "--out", str(out), "--rank", "2", "--device", "cuda"], "no CUDA device"))
    for args, message in cases:
        res = run("to-lora", *args)
        assert res.exit_code == 1, (args, res.output)
        err = res.stderr.strip()
        assert err.startswith("Error: ") and "\n" not in err and message in err, err
        assert _no_leftovers(out)
    assert (llama["path"] / WEIGHTS_NAME).is_file()  # the input is untouched


def test_non_finite_adapter_is_refused_naming_the_key(tiny, tmp_path, fresh_copy):
    path = fresh_copy(_make(tiny, "gpt2")["path"])
    tensors = load_file(path / WEIGHTS_NAME)
    key = f"{PREFIX}transformer.h.0.mlp.c_fc.bora_sigma"
    tensors[key][0, 0, 0] = float("nan")
    save_file(tensors, path / WEIGHTS_NAME)
    res = run("to-lora", path, "--out", tmp_path / "lora", "--rank", "2")
    assert res.exit_code == 1 and key in res.stderr and "non-finite" in res.stderr
    assert _no_leftovers(tmp_path / "lora")


def test_existing_outputs_are_refused_before_any_work_then_replaced_with_overwrite(llama, tmp_path):
    out, rep = tmp_path / "lora", tmp_path / "r.json"
    rep.write_text("keep me")
    with pytest.raises(OutputExistsError, match="r.json already exists"):
        to_lora(llama["path"], out, rank=2, report=rep)
    assert _no_leftovers(out) and rep.read_text() == "keep me"
    to_lora(llama["path"], out, rank=2, report=rep, overwrite=True)
    assert json.loads(rep.read_text())["policy"] == {"rank": 2, "energy": None}
    with pytest.raises(OutputExistsError):
        to_lora(llama["path"], out, rank=3)
    to_lora(llama["path"], out, rank=3, overwrite=True)
    assert _lora_layers(_peft("llama", out))["model.layers.0.mlp.up_proj"].r["default"] == 3
    assert not list(tmp_path.glob(".*bora-tmp-*"))


def test_out_inside_the_input_is_refused(llama):
    with pytest.raises(OutputWriteError, match="is, contains or lies inside the input"):
        to_lora(llama["path"], llama["path"] / "lora", rank=2)


def test_adapter_with_only_modules_to_save_is_refused_cleanly(tmp_path):
    from bora_tools.core.adapter import BoraAdapter, save_adapter

    cfg = BoraConfig(r=2, bora_blocks=1, modules_to_save=["lm_head"])
    src = save_adapter(BoraAdapter(cfg, {}, saved={"lm_head.weight": torch.randn(4, 4)}), tmp_path / "a")
    result = run("to-lora", src, "--out", tmp_path / "out", "--rank", "full")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "no adapted module" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_output_inside_the_input_is_refused(tmp_path):
    from bora_tools.core.adapter import BoraAdapter, BoraModule, save_adapter

    mod = BoraModule("q", torch.randn(2, 4), torch.randn(4, 2), torch.ones(1, 1, 2), 1.0)
    src = save_adapter(BoraAdapter(BoraConfig(r=2, bora_blocks=1), {"q": mod}), tmp_path / "a")
    result = run("to-lora", src, "--out", src / "lora", "--rank", "full")
    assert result.exit_code == 1 and "lies inside the input" in result.stderr and not (src / "lora").exists()


def test_float16_overflow_names_the_tensor(tmp_path):
    from bora_tools.core.adapter import BoraAdapter, BoraModule, save_adapter

    mod = BoraModule("q", torch.full((2, 4), 1e5), torch.full((4, 2), 1e5), torch.ones(1, 1, 2), 1.0)
    src = save_adapter(BoraAdapter(BoraConfig(r=2, bora_blocks=1), {"q": mod}), tmp_path / "a")
    result = run("to-lora", src, "--out", tmp_path / "o", "--rank", "1", "--dtype", "float16")
    assert (
        result.exit_code == 1 and "overflows float16" in result.stderr and "base_model.model.q.lora_" in result.stderr
    )
    assert not (tmp_path / "o").exists()
