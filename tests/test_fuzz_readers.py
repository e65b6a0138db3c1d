"""Hypothesis fuzzing of the readers: a clean BoraError or a correct result, never a crash.

Budget: 300 examples per target by default (the whole file runs in well under
a minute); set BORA_FUZZ_EXAMPLES for a deeper run.
"""

import json
import os
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bora_tools.core.adapter import BoraAdapter, BoraModule, load_adapter, save_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.errors import BoraError
from bora_tools.io.model_dir import INDEX_FILE, ModelDir, read_tensor

pytestmark = pytest.mark.slow  # 300 examples per target: several seconds each
FUZZ = settings(
    max_examples=int(os.environ.get("BORA_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapter_template(tmp_path_factory):
    cfg = BoraConfig(r=2, bora_blocks=2, target_modules=["q_proj"])
    mod = BoraModule(Q, torch.randn(2, 8), torch.randn(8, 2), torch.randn(2, 2, 2), 1.0)
    return save_adapter(BoraAdapter(cfg, {Q: mod}), tmp_path_factory.mktemp("t") / "a")


@pytest.fixture(scope="module")
def model_template(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"a.weight": torch.randn(4, 4), "b.weight": torch.randn(2)}, d / "s1.safetensors")
    save_file({"c.weight": torch.randn(3, 2).half()}, d / "s2.safetensors")
    wm = {"a.weight": "s1.safetensors", "b.weight": "s1.safetensors", "c.weight": "s2.safetensors"}
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


def fresh(template, tmp_path, name):
    target = tmp_path / name
    if target.exists():
        shutil.rmtree(target)
    return shutil.copytree(template, target)


def split_safetensors(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
header_fields = st.sampled_from(["dtype", "shape", "data_offsets"])


def load_or_clean_error(fn, *args):
    try:
        return fn(*args)
    except BoraError as e:
        assert "\n" not in e.one_line()
        return None


@FUZZ
@given(pos=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.none() | st.integers(0, 10_000))
def test_adapter_bytes_flipped_or_cut(tmp_path, adapter_template, pos, byte, cut):
    d = fresh(adapter_template, tmp_path, "a")
    f = d / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[pos % len(data)] = byte
    f.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    load_or_clean_error(load_adapter, d)


@FUZZ
@given(field=header_fields, value=json_values, which=st.integers(0, 2))
def test_adapter_header_fields_lie(tmp_path, adapter_template, field, value, which):
    d = fresh(adapter_template, tmp_path, "a")
    f = d / "adapter_model.safetensors"
    header, body = split_safetensors(f.read_bytes())
    key = sorted(k for k in header if k != "__metadata__")[which]
    header[key][field] = value
    f.write_bytes(join_safetensors(header, body))
    adapter = load_or_clean_error(load_adapter, d)
    if adapter is not None:  # accepted: then it must be internally consistent
        mod = adapter.modules[Q]
        assert mod.A.shape[0] == mod.B.shape[1] == mod.sigma.shape[2]


@FUZZ
@given(
    key=st.sampled_from(
        [
            "peft_type",
            "r",
            "bora_blocks",
            "lora_alpha",
            "use_rslora",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "fan_in_fan_out",
            "modules_to_save",
            "bias",
            "new",
        ]
    ),
    value=json_values,
    drop=st.booleans(),
)
def test_adapter_config_values(tmp_path, adapter_template, key, value, drop):
    d = fresh(adapter_template, tmp_path, "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    if drop:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    load_or_clean_error(load_adapter, d)


@FUZZ
@given(raw=st.text(max_size=40).map(str.encode) | st.binary(max_size=40))
def test_adapter_config_garbage(tmp_path, adapter_template, raw):
    d = fresh(adapter_template, tmp_path, "a")
    (d / "adapter_config.json").write_bytes(raw)
    load_or_clean_error(load_adapter, d)


def open_and_read_all(d):
    md = ModelDir.open(d)
    for entry in md.entries.values():
        read_tensor(entry)
    list(md.other_files())
    return md


shard_names = st.sampled_from(
    [
        "s1.safetensors",
        "s2.safetensors",
        "../s1.safetensors",
        "/tmp/x",
        "",
        "..",
        "a/b",
        "missing.safetensors",
        "config.json",
    ]
) | st.text(max_size=6)


@FUZZ
@given(
    tensor=st.sampled_from(["a.weight", "b.weight", "c.weight", "ghost"]),
    shard=shard_names | json_values,
    top=st.none() | json_values,
)
def test_index_mutations(tmp_path, model_template, tensor, shard, top):
    d = fresh(model_template, tmp_path, "m")
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"][tensor] = shard
    (d / INDEX_FILE).write_text(json.dumps(top if top is not None else index))
    load_or_clean_error(open_and_read_all, d)


@FUZZ
@given(
    shard=st.sampled_from(["s1.safetensors", "s2.safetensors"]),
    field=header_fields,
    value=json_values,
    tensor=st.integers(0, 1),
    cut=st.none() | st.integers(0, 200),
)
def test_shard_header_mutations(tmp_path, model_template, shard, field, value, tensor, cut):
    d = fresh(model_template, tmp_path, "m")
    f = d / shard
    header, body = split_safetensors(f.read_bytes())
    key = sorted(k for k in header if k != "__metadata__")[tensor % (len(header) - ("__metadata__" in header))]
    header[key][field] = value
    data = join_safetensors(header, body)
    f.write_bytes(data[:cut] if cut is not None else data)
    md = load_or_clean_error(open_and_read_all, d)
    if md is not None:
        for entry in md.entries.values():
            assert entry.nbytes == read_tensor(entry).numel() * read_tensor(entry).element_size()
