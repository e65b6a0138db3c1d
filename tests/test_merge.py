"""bora-tools merge: proven in transformers, against float64 references, byte for byte, and on every refusal."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from cli_support import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bora_tools.core import row_merge
from bora_tools.core.adapter import PREFIX, load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.core.factors import delta_weight
from bora_tools.core.row_merge import merge_plan, merged_weight
from bora_tools.errors import ModelDirError, ShapeError, UnsupportedError
from bora_tools.io.model_dir import INDEX_FILE, ModelDir
from bora_tools.io.safetensors import SafetensorsWriter, TensorSpec
from bora_tools.merge import merge_adapter

ATOL_LOGITS = 1e-4
IDS = torch.tensor([[0, 17, 42, 99, 3, 250, 7, 64, 128, 5]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _adapter(tiny, arch: str, *, model_kw=None, edit=None, **cfg):
    """A randomised BoRA adapter on the tiny ``arch`` model, saved (shared: read only)."""
    return tiny.adapter(arch, model_kwargs=model_kw, randomize=1, edit=edit,
                        **{"r": 4, "bora_blocks": 4, "lora_alpha": 8, **cfg})


def _make(tiny, arch: str, *, dtype=torch.float32, shard="40KB", edit=None, **cfg) -> dict:
    """A sharded base directory, a randomised BoRA adapter on it (both shared: read only), the reference logits."""
    made = _adapter(tiny, arch, edit=edit, **cfg)
    case = {"base": tiny.base(arch, max_shard_size=shard, dtype=dtype), "adapter": made.path, "config": made.config}
    if dtype == torch.float32:  # the models in memory hold the base directory's weights
        case |= {"base_logits": made.base_logits(IDS), "bora_logits": made.logits(IDS)}
    return case


def _no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.bora-tmp-*"))


def _dw64(adapter, name: str, scale: float = 1.0) -> torch.Tensor:
    mod = adapter.modules[name]
    return delta_weight(mod.A, mod.B, mod.sigma, mod.scaling * scale, dtype=torch.float64)


# -- proof in transformers -------------------------------------------------

@pytest.mark.parametrize("arch,cfg", [
    ("llama", {"use_rslora": True, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 3.0}}),
    ("qwen2", {}),
    ("gpt2", {"fan_in_fan_out": True}),
])
def test_merged_model_gives_the_bora_logits(tiny, tmp_path, arch, cfg):
    from transformers import AutoModelForCausalLM

    case = _make(tiny, arch, **cfg)
    adapter = case["adapter"]
    assert (case["bora_logits"] - case["base_logits"]).abs().max() > 0.1  # the adapter visibly changes the output
    report = merge_adapter(adapter, case["base"], tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits(merged) - case["bora_logits"]).abs().max() < ATOL_LOGITS
    base = ModelDir.open(case["base"])
    assert len(base.shard_names) > 3 and report.shards == len(base.shard_names)
    assert report.merged == len(load_adapter(adapter).modules)
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text()) == base.index  # same layout and size (float32)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (case["base"] / name).read_bytes()


def _shift_saved_lm_head(model):
    with torch.no_grad():
        model.lm_head.module.weight.add_(0.05)


@pytest.mark.slow
def test_modules_to_save_replace_the_base_tensor(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    case = _make(tiny, "llama", target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                 edit=_shift_saved_lm_head)
    adapter = case["adapter"]
    report = merge_adapter(adapter, case["base"], tmp_path / "out")
    assert report.replaced == 1
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits(merged) - case["bora_logits"]).abs().max() < ATOL_LOGITS


def test_merges_a_base_in_the_hugging_face_cache(tiny, tmp_path):
    # huggingface_hub's layout: every file of snapshots/<rev>/ is a symlink to ../../blobs/<hash>.
    from test_model_dir import hub_snapshot
    from transformers import AutoModelForCausalLM

    case = _make(tiny, "llama")
    snap = hub_snapshot(case["base"], tmp_path / "hub")
    merge_adapter(case["adapter"], snap, tmp_path / "out")
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())  # real files, not links into the cache
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits(merged) - case["bora_logits"]).abs().max() < ATOL_LOGITS


def test_stale_weight_files_stay_out_of_the_merged_model(tiny, tmp_path, fresh_copy):
    case = _make(tiny, "llama", target_modules=["v_proj"])
    adapter = case["adapter"]
    base = fresh_copy(case["base"])
    stale = ["consolidated.safetensors", "model.safetensors", "pytorch_model.bin", "original.pth", "model-q8.gguf"]
    for name in stale:
        (base / name).write_bytes(b"stale weights")
    result = run("merge", adapter, "--base", base, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and all(name in warnings[0] for name in stale)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not names & set(stale) and {"config.json", "tokenizer.json", INDEX_FILE} <= names


# -- weights against float64 references -----------------------------------

def _base_tensors(base: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(base.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_float32_merge_within_1e6_of_float64(tiny, tmp_path):
    case = _make(tiny, "llama")
    adapter_dir = case["adapter"]
    merge_adapter(adapter_dir, case["base"], tmp_path / "out", scale=0.5)
    adapter, base, merged = load_adapter(adapter_dir), _base_tensors(case["base"]), _base_tensors(tmp_path / "out")
    for name in adapter.modules:
        ref = base[name + ".weight"].double() + _dw64(adapter, name, 0.5)
        assert merged[name + ".weight"].dtype == torch.float32
        assert (merged[name + ".weight"].double() - ref).abs().max() < 1e-6
        assert not torch.equal(merged[name + ".weight"], base[name + ".weight"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_merge_rounds_once_and_copies_the_rest_byte_for_byte(tiny, tmp_path, dtype):
    case = _make(tiny, "qwen2", dtype=dtype)
    adapter_dir = case["adapter"]
    report = merge_adapter(adapter_dir, case["base"], tmp_path / "out")
    adapter, base, merged = load_adapter(adapter_dir), _base_tensors(case["base"]), _base_tensors(tmp_path / "out")
    for name in adapter.modules:
        ref = (base[name + ".weight"].double() + _dw64(adapter, name)).to(dtype)
        assert merged[name + ".weight"].dtype == dtype
        assert (merged[name + ".weight"] == ref).double().mean() > 0.999
    untouched = [n for n in base if n[: -len(".weight")] not in adapter.modules]
    assert report.copied == len(untouched) > 0
    base_dir, out_dir = ModelDir.open(case["base"]), ModelDir.open(tmp_path / "out")
    for name in untouched:
        a, b = base_dir.entries[name], out_dir.entries[name]
        assert _raw(a) == _raw(b)


def _raw(entry) -> bytes:
    with open(entry.shard, "rb") as f:
        f.seek(entry.start)
        return f.read(entry.nbytes)


def test_scale_zero_reproduces_the_base_files_byte_for_byte(tiny, tmp_path):
    # W + 0 * dW == W exactly: what is left to differ is the writer, whose
    # header and layout must be safetensors' own (the base was written by it).
    case = _make(tiny, "gpt2", fan_in_fan_out=True)
    merge_adapter(case["adapter"], case["base"], tmp_path / "out", scale=0.0)
    for f in case["base"].iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.slow
def test_dtype_bfloat16_casts_a_float32_base(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    case = _make(tiny, "llama")
    adapter_dir = case["adapter"]
    report = merge_adapter(adapter_dir, case["base"], tmp_path / "out", dtype="bfloat16")
    merged = _base_tensors(tmp_path / "out")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert report.converted > 0 and report.copied == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in merged.values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert model.dtype == torch.bfloat16
    assert (_logits(model) - case["bora_logits"]).abs().max() < 0.1  # bfloat16 weights: a looser, explicit bound


def test_single_file_base(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    case = _make(tiny, "llama", shard="10GB")
    assert (case["base"] / "model.safetensors").is_file()
    merge_adapter(case["adapter"], case["base"], tmp_path / "out")
    assert not (tmp_path / "out" / INDEX_FILE).exists()
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert (_logits(merged) - case["bora_logits"]).abs().max() < ATOL_LOGITS


# -- the per-tensor API and the writer ------------------------------------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_weight_in_small_chunks(monkeypatch, fan_in_fan_out):
    from bora_tools.core.adapter import BoraModule

    monkeypatch.setattr(row_merge, "CPU_CHUNK_ELEMENTS", 70)  # chunks cut across blocks of rows
    g = torch.Generator().manual_seed(0)
    m, n, b, r = 48, 32, 4, 3
    mod = BoraModule("x", torch.randn(r, n, generator=g), torch.randn(m, r, generator=g),
                     torch.randn(b, b, r, generator=g), 0.5)
    w = torch.randn(m, n, generator=g)
    dw = delta_weight(mod.A, mod.B, mod.sigma, 0.5 * 2.0, dtype=torch.float64)
    stored, ref = (w.T.contiguous(), (w.double() + dw).T) if fan_in_fan_out else (w, w.double() + dw)
    out = merged_weight(stored, mod, fan_in_fan_out=fan_in_fan_out, scale=2.0, out_dtype=torch.float32)
    assert out.shape == stored.shape and (out.double() - ref).abs().max() < 1e-5
    with pytest.raises(ShapeError, match="implies base shape"):
        merged_weight(torch.zeros(m + 4, n), mod, fan_in_fan_out=fan_in_fan_out)


def _descriptors_on(path: Path) -> int:
    """How many descriptors of this process are open on ``path`` (from Linux's /proc)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += Path(os.readlink(fd)) == path.resolve()
        except OSError:  # the descriptor of the listing itself, gone by now
            pass
    return count


def _q_proj(tiny) -> tuple:
    """The first q_proj's entry in the tiny llama base (one float32 file) and its BoRA module."""
    case = _make(tiny, "llama", shard=None)
    base, name = ModelDir.open(case["base"]), "model.layers.0.self_attn.q_proj.weight"
    return base, base.entries[name], merge_plan(load_adapter(case["adapter"]), base)[name]


def test_stream_rows_gives_the_merged_and_the_stored_rows(tiny, monkeypatch):
    monkeypatch.setattr(row_merge, "CPU_CHUNK_ELEMENTS", 64 * 5)  # blocks of 5 rows: several per block of B
    base, entry, module = _q_proj(tiny)
    weight = base.load(entry.name)
    merged = [b.clone() for b in row_merge.stream_rows(entry, module, scale=2.0)]
    assert [len(b) for b in merged] == [5] * 12 + [4]
    assert torch.equal(torch.cat(merged), merged_weight(weight, module, fan_in_fan_out=False, scale=2.0))
    assert not torch.equal(torch.cat(merged), weight)  # the update is there
    assert torch.equal(torch.cat([b.clone() for b in row_merge.stream_rows(entry)]), weight)  # without a module


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_stream_rows_owns_its_descriptor(tiny, monkeypatch, fresh_copy):
    monkeypatch.setattr(row_merge, "CPU_CHUNK_ELEMENTS", 64 * 5)
    _, entry, module = _q_proj(tiny)
    blocks = row_merge.stream_rows(entry, module)
    assert _descriptors_on(entry.shard) == 0  # nothing is opened before the first block is asked for
    next(blocks)
    assert _descriptors_on(entry.shard) == 1
    blocks.close()  # the consumer stops early
    assert _descriptors_on(entry.shard) == 0
    # A read that fails closes it too.
    copy = ModelDir.open(fresh_copy(entry.shard.parent))
    cut = copy.entries[entry.name]
    os.truncate(cut.shard, cut.start + cut.nbytes // 2)
    with pytest.raises(ModelDirError, match="truncated"):
        list(row_merge.stream_rows(cut, module))
    assert _descriptors_on(cut.shard) == 0


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_a_refused_merge_leaves_no_descriptor_open(tiny, tmp_path):
    case = _make(tiny, "llama", dtype=torch.float16, shard=None, target_modules=["v_proj"])
    with pytest.raises(UnsupportedError, match="overflows float16") as refused:
        merge_adapter(case["adapter"], case["base"], tmp_path / "out", scale=1e9)
    assert refused.traceback  # the frames of the merge are still alive, and yet:
    assert _descriptors_on(Path(case["base"]) / "model.safetensors") == 0
    assert _no_leftovers(tmp_path / "out")


def test_merge_plan_names_base_tensors(tiny, tmp_path):
    case = _make(tiny, "llama", target_modules=["q_proj"], modules_to_save=["lm_head"])
    plan = merge_plan(load_adapter(case["adapter"]), ModelDir.open(case["base"]))
    assert sorted(plan) == ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                            "model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(plan["lm_head.weight"], torch.Tensor)


def test_writer_bytes_equal_safetensors_save_file(tmp_path):
    tensors = {
        "z": torch.arange(3, dtype=torch.int64),
        "c": torch.randn(2, 3),
        "d": torch.zeros(0, 4),
        "é": torch.randn(1),
        "a": torch.randn(4, dtype=torch.bfloat16),
        "b": torch.randn(2, 2, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    order = ["z", "c", "d", "é", "a", "b"]  # safetensors' order: wider dtypes first, then by name
    specs = [
        TensorSpec(
            k,
            {torch.int64: "I64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[tensors[k].dtype],
            tuple(tensors[k].shape),
        )
        for k in order
    ]
    with SafetensorsWriter(tmp_path / "ours.safetensors", specs, metadata={"format": "pt"}) as w:
        for k in order:
            w.write(k, tensors[k])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", (tmp_path / "ours.safetensors").read_bytes()[:8])
    assert n % 8 == 0


def test_writer_enforces_order_and_completeness(tmp_path):
    specs = [TensorSpec("a", "F32", (2,)), TensorSpec("b", "F32", (1,))]
    with pytest.raises(RuntimeError, match="next tensor is 'a'"):
        with SafetensorsWriter(tmp_path / "x", specs) as w:
            w.write("b", torch.ones(1))
    with pytest.raises(RuntimeError, match="only 8 left"):
        with SafetensorsWriter(tmp_path / "x", specs) as w:
            w.write("a", torch.ones(3))
    with pytest.raises(RuntimeError, match="incomplete: tensor 'b'"):
        with SafetensorsWriter(tmp_path / "x", specs) as w:
            w.write("a", torch.ones(2))


def test_cast_finite_into_a_buffer_rounds_as_to():
    from bora_tools.core.dtypes import cast_finite

    x = torch.randn(64, 32) * 1e3
    for dtype in (torch.bfloat16, torch.float16):
        buf = torch.empty(64, 32, dtype=dtype)
        assert cast_finite(x, dtype, "w", out=buf) is buf
        assert torch.equal(buf.view(torch.int16), x.to(dtype).view(torch.int16))
    x[3, 4] = 7e4
    with pytest.raises(UnsupportedError, match=r"^w: a value \(7e\+04\) overflows float16"):
        cast_finite(x, torch.float16, "w", out=torch.empty(64, 32, dtype=torch.float16))


def test_writer_closes_its_file_when_the_header_cannot_be_written():
    # /dev/full opens, then refuses every write (ENOSPC): __enter__ fails after the open.
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="No space left"):
        with SafetensorsWriter("/dev/full", [TensorSpec("a", "F32", (2,))], background=True):
            pass
    assert set(os.listdir("/proc/self/fd")) <= fds


# -- the command line and every refusal -----------------------------------


@pytest.fixture(scope="module")
def llama(tiny) -> dict:
    return _make(tiny, "llama")


def test_cli_merges_and_reports_json(llama, tmp_path):
    out = tmp_path / "merged"
    result = run("merge", llama["adapter"], "--base", llama["base"], "--out", out, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["merged"] == 14 and summary["copied"] == 7 and summary["device"] == "cpu"
    assert ModelDir.open(out).entries.keys() == ModelDir.open(llama["base"]).entries.keys()
    again = run("merge", llama["adapter"], "--base", llama["base"], "--out", out, "--overwrite", "--scale", "0")
    assert again.exit_code == 0, again.output
    assert (out / "model-00002-of-00012.safetensors").read_bytes() == (
        llama["base"] / "model-00002-of-00012.safetensors"
    ).read_bytes()


def _expect_refusal(out: Path, result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()  # a progress label may come first
    errors = [line for line in lines if "Error" in line]
    assert len(errors) == 1 and lines[-1].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[-1], lines[-1]
    assert _no_leftovers(out)


def test_refuses_existing_output(llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run("merge", llama["adapter"], "--base", llama["base"], "--out", out)
    assert result.exit_code == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_refuses_an_output_that_holds_an_input(llama):
    parent = llama["base"].parent
    result = run("merge", llama["adapter"], "--base", llama["base"], "--out", parent, "--overwrite")
    assert result.exit_code == 1 and "the input" in result.stderr.splitlines()[-1]
    assert ModelDir.open(llama["base"]) and load_adapter(llama["adapter"])


@pytest.mark.parametrize("where", ["base", "adapter"])
def test_refuses_an_output_inside_an_input(llama, where):
    inside = llama[where] / "merged"
    before = sorted(p.name for p in llama[where].iterdir())
    _expect_refusal(
        inside,
        run("merge", llama["adapter"], "--base", llama["base"], "--out", inside),
        "lies inside the input",
        str(llama[where]),
    )
    assert sorted(p.name for p in llama[where].iterdir()) == before


def _poke(base: Path, name: str, value: float) -> None:
    """Set one element of base tensor ``name`` to ``value``, rewriting its shard."""
    entry = ModelDir.open(base).entries[name]
    tensors = load_file(entry.shard)
    tensors[name].view(-1)[0] = value
    save_file(tensors, entry.shard, metadata={"format": "pt"})


def test_refuses_float16_overflow_in_an_untouched_tensor(tiny, tmp_path, fresh_copy):
    case = _make(tiny, "llama", target_modules=["v_proj"])
    adapter = case["adapter"]
    base = fresh_copy(case["base"])
    _poke(base, "model.layers.1.mlp.up_proj.weight", 1e6)  # fine in float32, not in float16
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", base, "--out", tmp_path / "out", "--dtype", "float16"),
        "model.layers.1.mlp.up_proj.weight",
        "overflows float16",
    )
    assert merge_adapter(adapter, base, tmp_path / "out", dtype="bfloat16").converted > 0  # bfloat16 holds it


def _overflow_saved_lm_head(model):
    with torch.no_grad():
        model.lm_head.module.weight[3, 5] = 1e6


@pytest.mark.slow
def test_refuses_float16_overflow_in_a_modules_to_save_tensor(tiny, tmp_path):
    case = _make(tiny, "llama", target_modules=["v_proj"], modules_to_save=["lm_head"], edit=_overflow_saved_lm_head)
    adapter = case["adapter"]
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", case["base"], "--out", tmp_path / "out", "--dtype", "float16"),
        "lm_head.weight",
        "overflows float16",
    )


def test_refuses_module_absent_from_base(llama, tiny, tmp_path):
    adapter = _adapter(tiny, "llama", model_kw={"layers": 3}).path  # layer 2 does not exist in the 2-layer base
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", llama["base"], "--out", tmp_path / "out"),
        "model.layers.2.self_attn.q_proj",
        "no tensor",
    )


def test_refuses_mismatched_shapes(llama, tiny, tmp_path):
    adapter = _adapter(tiny, "llama", model_kw={"intermediate": 96}).path
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", llama["base"], "--out", tmp_path / "out"),
        "gate_proj",
        "(96, 64)",
        "(128, 64)",
    )


def _raw_adapter(tmp: Path, tensors: dict, **cfg) -> Path:
    path = tmp / "raw-adapter"
    path.mkdir()
    config = BoraConfig(**{"r": 2, "bora_blocks": 3, "target_modules": ["q_proj"], **cfg})
    config.save(path)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def test_refuses_blocks_that_do_not_divide(llama, tmp_path):
    key = PREFIX + "model.layers.0.self_attn.q_proj"
    adapter = _raw_adapter(
        tmp_path,
        {
            key + ".lora_A.weight": torch.zeros(2, 64),
            key + ".lora_B.weight": torch.zeros(64, 2),
            key + ".bora_sigma": torch.ones(3, 3, 2),
        },
    )
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", llama["base"], "--out", tmp_path / "out"),
        "q_proj",
        "not divisible by bora_blocks b=3",
    )


def test_refuses_non_finite_values(llama, tmp_path):
    key = PREFIX + "model.layers.0.self_attn.q_proj"
    b_factor = torch.zeros(64, 2)
    b_factor[3, 1] = float("nan")
    adapter = _raw_adapter(
        tmp_path,
        {
            key + ".lora_A.weight": torch.zeros(2, 64),
            key + ".lora_B.weight": b_factor,
            key + ".bora_sigma": torch.ones(2, 2, 2),
        },
        bora_blocks=2,
    )
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", llama["base"], "--out", tmp_path / "out"),
        key + ".lora_B.weight",
        "non-finite",
    )


def test_refuses_shard_names_outside_the_base(llama, tmp_path, fresh_copy):
    base = fresh_copy(llama["base"], "base")
    index = json.loads((base / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "../evil.safetensors"
    (base / INDEX_FILE).write_text(json.dumps(index))
    result = run("merge", llama["adapter"], "--base", base, "--out", tmp_path / "out")
    _expect_refusal(tmp_path / "out", result, "../evil.safetensors")


def test_refuses_tied_lm_head(tiny, tmp_path):
    case = _make(tiny, "qwen2", target_modules=["q_proj", "lm_head"])
    adapter = case["adapter"]
    _expect_refusal(
        tmp_path / "out", run("merge", adapter, "--base", case["base"], "--out", tmp_path / "out"), "lm_head", "tie"
    )


def test_refuses_float16_overflow(tiny, tmp_path):
    case = _make(tiny, "llama", dtype=torch.float16, target_modules=["v_proj"])
    adapter = case["adapter"]
    _expect_refusal(
        tmp_path / "out",
        run("merge", adapter, "--base", case["base"], "--out", tmp_path / "out", "--scale", "1e9"),
        "v_proj",
        "overflows float16",
    )


def test_refuses_non_finite_scale(llama, tmp_path):
    _expect_refusal(
        tmp_path / "out",
        run("merge", llama["adapter"], "--base", llama["base"], "--out", tmp_path / "out", "--scale", "nan"),
        "--scale",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_refuses_cuda_without_a_gpu(llama, tmp_path):
    _expect_refusal(
        tmp_path / "out",
        run("merge", llama["adapter"], "--base", llama["base"], "--out", tmp_path / "out", "--device", "cuda"),
        "--device cuda",
        "no CUDA device",
    )


def test_merged_weight_rounds_once_to_out_dtype():
    from bora_tools.core.adapter import BoraModule

    g = torch.Generator().manual_seed(1)
    mod = BoraModule(
        "x", torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), torch.randn(2, 2, 2, generator=g), 1.0
    )
    w = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    out = merged_weight(w, mod, fan_in_fan_out=False)
    ref = (w.double() + delta_weight(mod.A, mod.B, mod.sigma, 1.0, dtype=torch.float64)).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and (out == ref).float().mean() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_matches_cpu(llama, tmp_path):
    merge_adapter(llama["adapter"], llama["base"], tmp_path / "cpu", device="cpu")
    merge_adapter(llama["adapter"], llama["base"], tmp_path / "gpu", device="cuda")
    cpu, gpu = _base_tensors(tmp_path / "cpu"), _base_tensors(tmp_path / "gpu")
    assert all((cpu[k] - gpu[k]).abs().max() < 1e-5 for k in cpu)
