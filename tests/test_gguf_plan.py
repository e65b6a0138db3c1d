"""gguf/plan.py and the checks of export_gguf: tensors named, checked, then planned; every guard once per path."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bora_tools.errors import UnsupportedError
from bora_tools.gguf import export as gguf_export
from bora_tools.gguf import lora as gguf_lora
from bora_tools.gguf import quantize as gguf_quantize
from bora_tools.gguf.architectures import family_for
from bora_tools.gguf.export import export_gguf
from bora_tools.gguf.plan import name_tensors, plan_tensors
from bora_tools.io.model_dir import ModelDir
from tests.gguf_support import needs_llama_cpp, tiny_dir

GUARDS = ("refuse_output_over_inputs", "check_threads", "require_llama_cpp")


def _counted(monkeypatch) -> Counter:
    """Count every call of the guards, through whichever gguf module calls them."""
    calls: Counter = Counter()
    for module in (gguf_export, gguf_lora, gguf_quantize):
        for name in GUARDS:
            original = getattr(module, name, None)
            if original is None:
                continue

            def counting(*args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("kind,outtype", [
    ("model", "f16"), ("merged", "f16"), ("lora", "f16"),
    pytest.param("model", "q4_0", marks=needs_llama_cpp), pytest.param("merged", "q4_0", marks=needs_llama_cpp),
])
def test_every_guard_runs_once(tiny, tmp_path, monkeypatch, kind, outtype):
    base = tiny.base("llama")
    adapter = tiny.adapter("llama", randomize=1, r=4, bora_blocks=4, lora_alpha=8).path
    calls = _counted(monkeypatch)
    source, extra = (base, {}) if kind == "model" else (adapter, {"base": base, "merge": kind == "merged"})
    report = export_gguf(source, tmp_path / "out.gguf", outtype=outtype, threads=1, **extra)
    assert report.kind == kind and (tmp_path / "out.gguf").is_file()
    quantizer = outtype == "q4_0"
    assert calls == Counter(refuse_output_over_inputs=1, check_threads=1, **({"require_llama_cpp": 1} if quantizer
                                                                             else {}))


def _named(model_dir: Path):
    model = ModelDir.open(model_dir)
    family = family_for(model.architecture, source="config.json")
    hp = family.read_hparams(model.config, source="config.json")
    return model, family, hp, name_tensors(model, family, hp)


def test_tensors_are_named_in_the_shards_order_and_the_unknown_collected(tmp_path):
    model_dir = tiny_dir(tmp_path, "llama")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.0.mlp.extra.weight"] = torch.zeros(4)  # llama.cpp has no name for it
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:-1]  # and a bad shape
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    model, family, hp, named = _named(model_dir)
    stored = [e.name for e in model.shard_entries("model.safetensors") if e.name != "model.layers.0.mlp.extra.weight"]
    assert [entries[0].name for _, entries in named.tensors] == stored
    assert dict((e[0].name, g) for g, e in named.tensors)["model.embed_tokens.weight"] == "token_embd.weight"
    assert named.embedding_rows == hp.vocab_size
    assert named.unsupported == ["model.layers.0.mlp.extra.weight: no llama.cpp llama tensor corresponds to it"]
    # The unknown tensor is refused first (as before the shapes); without it, the shape is.
    with pytest.raises(UnsupportedError, match="mlp.extra.weight"):
        plan_tensors(named, family, hp, "f16", replacements={})
    named.unsupported.clear()
    with pytest.raises(Exception, match=r"up_proj\.weight: shape \(\d+, 64\)"):
        plan_tensors(named, family, hp, "f16", replacements={})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_a_refused_export_leaves_no_descriptor_open(tmp_path):
    model_dir = tiny_dir(tmp_path, "llama")
    shard = model_dir / "model.safetensors"
    weights = load_file(shard)
    weights["model.layers.1.mlp.up_proj.weight"][-1, 0] = 1e6  # beyond float16, in the tensor's last block
    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match="overflows float16") as refused:
        export_gguf(model_dir, tmp_path / "out.gguf", outtype="f16")
    assert refused.traceback  # the export's frames are alive, and yet no descriptor is left on the shard
    assert sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(shard.resolve())
               for fd in os.listdir("/proc/self/fd")) == 0
    assert not (tmp_path / "out.gguf").exists()
