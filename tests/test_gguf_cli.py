"""``bora-tools export-gguf`` on the command line: reports, and every bad input refused cleanly."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch
from cli_support import run
from gguf_support import set_config
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny):
    """A directory that holds a llama base and an adapter on it (copies: the tests aim outputs at all three)."""
    root = tmp_path_factory.mktemp("gguf-cli")
    base = shutil.copytree(tiny.base("llama"), root / "llama")
    adapter = tiny.adapter("llama", r=2, bora_blocks=2, target_modules=["q_proj", "v_proj"]).path
    return root, base, shutil.copytree(adapter, root / "adapter")


def assert_refused(result, *fragments, code=1):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".gguf") or ".bora-tmp-" in p.name)


def test_model_json_report(dirs, tmp_path):
    _, base, _ = dirs
    out = tmp_path / "m.gguf"
    result = run("export-gguf", base, "--out", out, "--outtype", "q8_0", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "model" and report["types"] == {"F32": 5, "Q8_0": 16}
    assert report["vocab"]["padded"] == 20 and report["bytes"] == out.stat().st_size
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


def test_lora_and_merge_text_reports(dirs, tmp_path):
    _, base, adapter = dirs
    result = run("export-gguf", adapter, "--base", base, "--out", tmp_path / "l.gguf", "--rank", "2", "--quiet")
    assert result.exit_code == 0, result.output
    assert "lora" in result.output and "blk.1.attn_v.weight" in result.output
    result = run("export-gguf", adapter, "--base", base, "--merge", "--out", tmp_path / "m.gguf", "--quiet")
    assert result.exit_code == 0 and "4 adapted weights merged in one pass" in result.output


def test_existing_output_refused_then_overwritten(dirs, tmp_path):
    _, base, _ = dirs
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    assert_refused(run("export-gguf", base, "--out", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep"
    assert run("export-gguf", base, "--out", out, "--overwrite", "--quiet").exit_code == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("extra,fragments,code", [
    ([], ["is an adapter", "--base"], 1),
    (["--merge"], ["is an adapter", "records no base model", "--base"], 1),  # no --base, none recorded
])
def test_adapter_needs_base(dirs, tmp_path, extra, fragments, code):
    _, _, adapter = dirs
    assert_refused(run("export-gguf", adapter, "--out", tmp_path / "x.gguf", *extra), *fragments, code=code)
    assert leftovers(tmp_path) == []


def test_option_combinations_refused(dirs, tmp_path):
    _, base, adapter = dirs
    out = tmp_path / "x.gguf"
    assert_refused(run("export-gguf", base, "--base", base, "--out", out), "--base applies only")
    assert_refused(run("export-gguf", base, "--rank", "4", "--out", out), "--rank applies only", code=2)
    assert_refused(run("export-gguf", adapter, "--base", base, "--merge", "--rank", "4", "--out", out), "--rank",
                   code=2)
    assert_refused(run("export-gguf", adapter, "--base", base, "--rank", "zero", "--out", out), "--rank", code=2)
    assert_refused(run("export-gguf", adapter, "--base", base, "--rank", "0", "--out", out), "--rank", code=2)
    assert_refused(run("export-gguf", base, "--outtype", "q4_z", "--out", out), "--outtype", code=2)
    assert leftovers(tmp_path) == []


def _copy(base, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(base, path)
    return path


def test_bad_models_refused(dirs, tmp_path, gpt2_base):
    _, base, _ = dirs
    out = tmp_path / "x.gguf"
    gpt2 = gpt2_base
    assert_refused(run("export-gguf", gpt2, "--out", out), "GPT2LMHeadModel", "not supported")

    model = _copy(base, tmp_path)
    set_config(model, num_attention_heads=None, rope_parameters={"rope_type": "yarn", "factor": 4.0})
    assert_refused(run("export-gguf", model, "--out", out), "num_attention_heads", "positive integer")
    set_config(model, num_attention_heads=4)
    assert_refused(run("export-gguf", model, "--out", out), "rope_type 'yarn'", "not supported")
    set_config(model, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, vocab_size=200)
    assert_refused(run("export-gguf", model, "--out", out), "300 tokens", "vocab_size is 200")
    set_config(model, vocab_size=320)
    (model / "tokenizer.json").unlink()
    assert_refused(run("export-gguf", model, "--out", out), "no tokenizer.json or tokenizer.model")
    assert leftovers(tmp_path) == []


def test_unknown_tensor_refused(dirs, tmp_path):
    _, base, _ = dirs
    model = _copy(base, tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors["model.vision_tower.proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert_refused(run("export-gguf", model, "--out", tmp_path / "x.gguf"), "model.vision_tower.proj.weight",
                   "no llama.cpp llama tensor")
    assert leftovers(tmp_path) == []


def test_adapter_for_another_base_refused(dirs, tmp_path, tiny):
    _, _, adapter = dirs
    other = tiny.base("llama", hidden=32, heads=2, kv_heads=1)
    for extra in ([], ["--merge"]):
        assert_refused(run("export-gguf", adapter, "--base", other, "--out", tmp_path / "x.gguf", *extra),
                       "q_proj", "another base model")
    assert leftovers(tmp_path) == []


def test_failure_while_writing_leaves_nothing(dirs, tmp_path, monkeypatch):
    from bora_tools.gguf import writer as gguf_write

    _, base, _ = dirs
    calls = []

    def broken(t, qtype, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return original(t, qtype, **kwargs)

    original = gguf_write.to_gguf_array
    monkeypatch.setattr(gguf_write, "to_gguf_array", broken)
    assert_refused(run("export-gguf", base, "--out", tmp_path / "x.gguf"), "no space left on device")
    assert leftovers(tmp_path) == []


def _fingerprint(*dirs):
    """Every file under ``dirs`` with its bytes: an input that changes, or a leftover, shows."""
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode,inside,target", [
    ("model", "base", "model.safetensors"),
    ("merge", "base", "model.safetensors"),
    ("merge", "adapter", "adapter_model.safetensors"),
    ("merge", "adapter", "sub/m.gguf"),
    ("lora", "adapter", "adapter_config.json"),
    ("lora", "base", "lora.gguf"),
])
def test_output_over_an_input_refused_even_with_overwrite(dirs, mode, inside, target):
    root, base, adapter = dirs
    out = {"root": root, "base": base, "adapter": adapter}[inside] / target
    source = ["export-gguf", base] if mode == "model" else ["export-gguf", adapter, "--base", base]
    before = _fingerprint(base, adapter)
    result = run(*source, *(["--merge"] if mode == "merge" else []), "--out", out, "--overwrite")
    assert_refused(result, "inputs are never modified")
    assert _fingerprint(base, adapter) == before
    assert not (adapter / "sub").exists()


@pytest.mark.parametrize("mode,inside", [("model", "base"), ("model", "root"), ("merge", "adapter"),
                                         ("lora", "adapter"), ("lora", "root")])
def test_library_refuses_an_output_that_is_or_holds_an_input(dirs, mode, inside):
    """The CLI refuses a directory --out already; the library refuses it as well, before any work."""
    from bora_tools.errors import OutputWriteError
    from bora_tools.gguf.export import export_gguf

    root, base, adapter = dirs
    out = {"root": root, "base": base, "adapter": adapter}[inside]
    before = _fingerprint(base, adapter)
    kwargs = {} if mode == "model" else {"base": base, "merge": mode == "merge"}
    with pytest.raises(OutputWriteError, match="inputs are never modified"):
        export_gguf(base if mode == "model" else adapter, out, overwrite=True, **kwargs)
    assert _fingerprint(base, adapter) == before


def _with_value(base, tmp_path, name, row, value):
    model = _copy(base, tmp_path)
    tensors = load_file(model / "model.safetensors")
    tensors[name][row, 0] = value
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return model


def test_float16_overflow_refused_naming_the_tensor(dirs, tmp_path):
    _, base, _ = dirs
    # Token 310 is padding (the tokenizer has 300 tokens): harmless to the logits, fatal to float16.
    model = _with_value(base, tmp_path, "model.embed_tokens.weight", 310, 1e6)
    out = tmp_path / "x.gguf"
    assert_refused(run("export-gguf", model, "--out", out, "--outtype", "f16"),
                   "token_embd.weight (model.embed_tokens.weight)", "1e+06", "overflows float16")
    assert leftovers(tmp_path) == []
    assert run("export-gguf", model, "--out", out, "--outtype", "f32", "--quiet").exit_code == 0
    reader = gguf.GGUFReader(out)
    assert float(next(t for t in reader.tensors if t.name == "token_embd.weight").data[310, 0]) == 1e6


def test_merged_float16_overflow_refused(dirs, tmp_path):
    _, base, adapter = dirs
    model = _with_value(base, tmp_path, "model.layers.0.self_attn.q_proj.weight", 0, 7e4)
    assert_refused(run("export-gguf", adapter, "--base", model, "--merge", "--out", tmp_path / "x.gguf",
                       "--outtype", "f16"), "blk.0.attn_q.weight (model.layers.0.self_attn.q_proj.weight (merged))",
                   "overflows float16")
    assert leftovers(tmp_path) == []
