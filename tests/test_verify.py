"""verify on a tiny llama: every output kind passes untouched, and each kind of damage fails, in its own test.

The outputs are made by bora-tools itself (merge, to-lora, export-gguf), then run where they will run
(transformers, PEFT, llama.cpp) by ``verify``; a damaged copy must fail with the measure and position named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from cli_support import Q, first_shard
from gguf_support import needs_llama_cpp
from safetensors.torch import load_file, save_file

from bora_tools.conversion import to_lora
from bora_tools.gguf.export import export_gguf
from bora_tools.io.model_dir import INDEX_FILE
from bora_tools.merge import merge_adapter
from bora_tools.verification import verify

pytestmark = pytest.mark.slow  # each verify loads the reference and the output: seconds per test

SETTINGS = dict(r=4, bora_blocks=2, lora_alpha=8)


@pytest.fixture(scope="module")
def made(tiny, tmp_path_factory) -> dict[str, Path]:
    """A sharded tiny llama, a BoRA adapter on it, and what bora-tools makes from them (shared: copy to damage)."""
    root = tmp_path_factory.mktemp("verify")
    base = tiny.base("llama", max_shard_size="40KB")
    adapter = tiny.adapter("llama", **SETTINGS).path
    paths = {"base": base, "adapter": adapter}
    merge_adapter(adapter, base, root / "merged")
    merge_adapter(adapter, base, root / "merged-bf16", dtype="bfloat16")
    to_lora(adapter, root / "lora", rank="full")
    to_lora(adapter, root / "lora-3", rank=3)
    for name in ("merged", "merged-bf16", "lora", "lora-3"):
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def ggufs(made, tmp_path_factory) -> dict[str, Path]:
    """The GGUF outputs: the base (f32), the merged model (f32, q8_0, q4_k_m) and a LoRA (f32)."""
    root = tmp_path_factory.mktemp("verify-gguf")
    out = {"base": root / "base-f32.gguf", "lora": root / "lora-f32.gguf"}
    export_gguf(made["base"], out["base"], outtype="f32")
    export_gguf(made["adapter"], out["lora"], base=made["base"], outtype="f32")
    for outtype in ("f32", "f16", "q8_0", "q4_k_m"):
        out[outtype] = root / f"merged-{outtype}.gguf"
        export_gguf(made["adapter"], out[outtype], base=made["base"], merge=True, outtype=outtype, threads=2)
    return out


def check(output: Path, made: dict, **kwargs):
    return verify(output, made["adapter"], base=made["base"], tokens=24, **kwargs)


def assert_fails(report, measure: str) -> None:
    assert not report.passed, report.to_text()
    assert report.tolerance.measure == measure
    assert report.failure.startswith({"max_rel_error": "max relative logit error",
                                      "mean_kl": "mean KL(reference || output)"}[measure])
    assert "prompt " in report.failure and "position " in report.failure


# -- untouched outputs pass -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "type_"), [("merged", "merged", "float32"),
                                                      ("merged-bf16", "merged", "bfloat16"),
                                                      ("lora", "lora", "float32")])
def test_untouched_transformers_and_peft_outputs_pass(made, name, kind, type_):
    report = check(made[name], made)
    assert report.passed, report.to_text()
    assert (report.kind, report.type, report.engine) == (kind, type_, "transformers" if kind == "merged" else "peft")
    assert report.effect > 30 * report.tolerance.bound  # the adapter visibly moves the logits: the check can fail
    assert report.overall["top1"] == 1.0 and report.overall["correlation"] > 0.999
    assert len(report.prompts) == 5 and all(p["tokens"] <= 24 for p in report.prompts)


def test_float32_outputs_are_within_the_exact_bound(made):
    for name in ("merged", "lora"):
        report = check(made[name], made)
        assert report.overall["max_rel_error"] < 1e-5 and report.overall["mean_kl"] < 1e-9
        assert report.tolerance.bound == 1e-4 and report.tolerance.source == "docs/guarantees.md"


def test_precise_runs_reference_and_output_in_float64(made):
    report = check(made["merged"], made, precise=True)
    assert report.passed and report.reference_dtype == "float64"
    assert report.overall["max_rel_error"] < 1e-6  # only the merged file's float32 rounding is left


def test_truncated_lora_passes_within_the_predicted_error(made):
    report = check(made["lora-3"], made)
    assert report.passed, report.to_text()
    assert "predicted error" in report.tolerance.source
    recorded = json.loads(load_meta(made["lora-3"])["bora_tools.to_lora"])
    assert recorded["max_rel_error"] > 0.01 and recorded["policy"]["rank"] == 3
    assert report.overall["max_rel_error"] > 1e-4  # the truncation shows, and stays inside what was predicted


def load_meta(lora: Path) -> dict:
    from safetensors import safe_open

    with safe_open(lora / "adapter_model.safetensors", "pt") as f:
        return f.metadata()


@needs_llama_cpp
@pytest.mark.parametrize("name", ["f32", "f16", "q8_0", "q4_k_m"])
def test_untouched_gguf_models_pass(made, ggufs, name):
    report = check(ggufs[name], made)
    assert report.passed, report.to_text()
    assert (report.kind, report.type, report.engine) == ("gguf", f"gguf-{name}", "llama.cpp")
    assert report.tolerance.measure == ("max_rel_error" if name in ("f32", "f16") else "mean_kl")


@needs_llama_cpp
def test_untouched_gguf_lora_passes_on_the_base_gguf(made, ggufs):
    report = check(ggufs["lora"], made, base_gguf=ggufs["base"])
    assert report.passed, report.to_text()
    assert (report.kind, report.type) == ("gguf-lora", "gguf-f32")


@needs_llama_cpp
def test_split_gguf_passes_from_any_of_its_files(made, ggufs, tmp_path):
    parts = split_gguf(ggufs["f32"], tmp_path / "merged.gguf", max_tensors=8)
    assert len(parts) > 2 and parts[0].name == f"merged-00001-of-{len(parts):05d}.gguf"
    report = check(parts[1], made)
    assert report.passed, report.to_text()
    assert report.output == str(parts[0])


def split_gguf(src: Path, out: Path, *, max_tensors: int) -> list[Path]:
    """Rewrite ``src`` as split GGUFs with gguf-py's writer (``split_max_tensors``): llama.cpp's split layout."""
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out, arch, split_max_tensors=max_tensors)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.Split.LLM_KV_SPLIT_NO,
                                                gguf.Keys.Split.LLM_KV_SPLIT_COUNT,
                                                gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


# -- damaged outputs fail, each in its own test ---------------------------------------------------------------


def edit_model_tensor(model_dir: Path, name: str, change) -> None:
    shard = model_dir / json.loads((model_dir / INDEX_FILE).read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = change(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})


def test_a_merged_tensor_scaled_by_1_01_fails(made, fresh_copy):
    merged = fresh_copy(made["merged"])
    edit_model_tensor(merged, "model.layers.1.mlp.down_proj.weight", lambda t: t * 1.01)
    assert_fails(check(merged, made), "max_rel_error")


def test_a_merged_shard_swapped_for_the_bases_fails(made, fresh_copy):
    merged = fresh_copy(made["merged"])
    shard = first_shard(merged)
    shutil.copyfile(made["base"] / shard.name, shard)
    assert_fails(check(merged, made), "max_rel_error")


def test_a_lora_with_lora_alpha_doubled_fails(made, fresh_copy):
    lora = fresh_copy(made["lora"])
    config = json.loads((lora / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (lora / "adapter_config.json").write_text(json.dumps(config))
    assert_fails(check(lora, made), "max_rel_error")


def test_a_lora_with_one_modules_b_negated_fails(made, fresh_copy):
    lora = fresh_copy(made["lora"])
    weights = lora / "adapter_model.safetensors"
    meta = load_meta(lora)
    tensors = load_file(weights)
    tensors[f"{Q}.lora_B.weight"].neg_()
    save_file(tensors, weights, metadata=meta)
    assert_fails(check(lora, made), "max_rel_error")


@needs_llama_cpp
def test_a_gguf_with_one_tensor_perturbed_fails(made, ggufs, tmp_path):
    damaged = Path(shutil.copy(ggufs["f32"], tmp_path / "merged-f32.gguf"))
    reader = gguf.GGUFReader(damaged, "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    tensor.data[...] *= 1.01
    del reader
    assert_fails(check(damaged, made), "max_rel_error")


@needs_llama_cpp
def test_a_gguf_lora_with_the_wrong_alpha_fails(made, ggufs, tmp_path):
    damaged = Path(shutil.copy(ggufs["lora"], tmp_path / "lora-f32.gguf"))
    reader = gguf.GGUFReader(damaged, "r+")
    field = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA)
    field.parts[field.data[0]][0] *= 2
    del reader
    assert gguf.GGUFReader(damaged).get_field(gguf.Keys.Adapter.LORA_ALPHA).contents() == 2 * \
        gguf.GGUFReader(ggufs["lora"]).get_field(gguf.Keys.Adapter.LORA_ALPHA).contents()
    assert_fails(check(damaged, made, base_gguf=ggufs["base"]), "max_rel_error")


@needs_llama_cpp
def test_a_q4_k_m_made_from_the_wrong_adapter_fails(made, tiny, tmp_path):
    wrong = tiny.adapter("llama", randomize=7, **SETTINGS).path
    out = tmp_path / "wrong-q4_k_m.gguf"
    export_gguf(wrong, out, base=made["base"], merge=True, outtype="q4_k_m", threads=2)
    assert_fails(check(out, made), "mean_kl")
