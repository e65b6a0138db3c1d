"""Model directories: headers that lie, unsafe shard names, symlinks, missing shards."""

import json
import logging
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bora_tools.errors import ModelDirError, UnsafePathError
from bora_tools.io.model_dir import INDEX_FILE, ModelDir, read_header, read_tensor
from bora_tools.progress import logger


def test_reads_every_tensor_like_safetensors(llama_sharded):
    md = ModelDir.open(llama_sharded)
    assert len(md.shard_names) > 1 and md.architecture == "LlamaForCausalLM"
    seen = 0
    for shard in md.shard_names:
        ref = load_file(llama_sharded / shard)
        for entry in md.shard_entries(shard):
            assert torch.equal(read_tensor(entry), ref[entry.name])
            seen += 1
    assert seen == len(md.entries) == len(json.loads((llama_sharded / INDEX_FILE).read_text())["weight_map"])
    names = {p.name for p in md.other_files()}
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= names and INDEX_FILE not in names


def write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,match", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "fall outside the 8 data bytes"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, "12 bytes for a F32 tensor"),
    ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unknown dtype 'Q9'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "not a list of non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}, b"\0" * 4, "not a pair of integers"),
])
def test_lying_headers(tmp_path, header, data, match):
    write_raw(tmp_path / "x.safetensors", header, data)
    with pytest.raises(ModelDirError, match=match):
        read_header(tmp_path / "x.safetensors")


def test_header_length_beyond_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(ModelDirError, match="header length 1000000 exceeds the file"):
        read_header(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"\1\2")
    with pytest.raises(ModelDirError, match="truncated"):
        read_header(tmp_path / "y.safetensors")


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_index_naming_shards_outside_is_refused(llama_sharded, fresh_copy, shard):
    d = fresh_copy(llama_sharded, "m")
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = shard
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UnsafePathError, match="not a plain file name"):
        ModelDir.open(d)


def test_symlinked_shard_leading_outside_is_refused(tmp_path, llama_sharded, fresh_copy):
    d = fresh_copy(llama_sharded, "m")
    outside = tmp_path / "outside.safetensors"
    name = json.loads((d / INDEX_FILE).read_text())["weight_map"]["lm_head.weight"]
    os.replace(d / name, outside)
    os.symlink(outside, d / name)
    with pytest.raises(UnsafePathError, match="symlink leads outside"):
        ModelDir.open(d)


def test_missing_shard_and_missing_weights(llama_sharded, fresh_copy):
    d = fresh_copy(llama_sharded, "m")
    name = json.loads((d / INDEX_FILE).read_text())["weight_map"]["lm_head.weight"]
    os.remove(d / name)
    with pytest.raises(ModelDirError, match=f"shard {name} is missing"):
        ModelDir.open(d)
    for p in d.glob("*.safetensors*"):
        os.remove(p)
    with pytest.raises(ModelDirError, match="no model.safetensors"):
        ModelDir.open(d)


def test_index_naming_a_tensor_its_shard_lacks(llama_sharded, fresh_copy):
    d = fresh_copy(llama_sharded, "m")
    index = json.loads((d / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["ghost.weight"] = first
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ModelDirError, match=f"index names ghost.weight in {first}"):
        ModelDir.open(d)


def test_bad_config(llama_sharded, fresh_copy):
    d = fresh_copy(llama_sharded, "m")
    (d / "config.json").write_text("[1")
    with pytest.raises(ModelDirError, match="config.json: not valid JSON"):
        ModelDir.open(d)


def test_single_file_bf16(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    t = torch.randn(4, 6).to(torch.bfloat16)
    save_file({"w": t}, d / "model.safetensors")
    md = ModelDir.open(d)
    assert md.entry("w").dtype == "BF16" and torch.equal(md.load("w"), t)


STALE = ["consolidated.safetensors", "model.safetensors", "pytorch_model.bin", "pytorch_model-00001-of-00002.bin",
         "pytorch_model.bin.index.json", "original.pth", "optimizer.pt", "last.ckpt", "model-q8.gguf", "tf_model.h5",
         "flax_model.msgpack"]


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_other_files_leave_out_weights_that_are_not_shards(llama_sharded, fresh_copy):
    d = fresh_copy(llama_sharded, "m")
    for name in STALE:
        (d / name).write_bytes(b"stale weights")
    collect = Collect()  # on the logger itself: the CLI stops it propagating to pytest's handler
    logger.addHandler(collect)
    try:
        names = {p.name for p in ModelDir.open(d).other_files()}
    finally:
        logger.removeHandler(collect)
    assert names == {p.name for p in ModelDir.open(llama_sharded).other_files()}
    assert {"config.json", "tokenizer.json"} <= names and not names & set(STALE)
    assert len(collect.messages) == 1 and all(name in collect.messages[0] for name in STALE)


def hub_snapshot(src, root):
    """``src`` laid out as huggingface_hub caches it: snapshots/<rev>/NAME -> ../../blobs/<hash>."""
    import hashlib

    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / f.name)
    return snap


def test_hub_cache_snapshot_opens(tmp_path, llama_sharded):
    snap = hub_snapshot(llama_sharded, tmp_path / "hub")
    md = ModelDir.open(snap)
    assert all((snap / n).is_symlink() for n in md.shard_names)
    for name, entry in ModelDir.open(llama_sharded).entries.items():
        assert torch.equal(md.load(name), read_tensor(entry))
    assert {p.name for p in md.other_files()} == {p.name for p in ModelDir.open(llama_sharded).other_files()}


def test_hub_cache_symlink_outside_its_blobs_is_refused(tmp_path, llama_sharded):
    snap = hub_snapshot(llama_sharded, tmp_path / "hub")
    name = json.loads((snap / INDEX_FILE).read_text())["weight_map"]["lm_head.weight"]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((snap / name).read_bytes())
    os.remove(snap / name)
    os.symlink(outside, snap / name)
    with pytest.raises(UnsafePathError, match="symlink leads outside"):
        ModelDir.open(snap)
