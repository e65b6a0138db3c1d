"""Hostile inputs across every command: one `Error:` line naming the culprit, a
non-zero exit, no traceback, and nothing left behind."""

import json
import math
import os
import pickle
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from bora_tools.cli import cli
from bora_tools.io.model_dir import INDEX_FILE

ST = "adapter_model.safetensors"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def pristine(tiny, llama_sharded):
    adapter = tiny.adapter("llama", r=4, bora_blocks=2, lora_alpha=8)
    other = tiny.adapter("llama", model_kwargs=dict(hidden=32, intermediate=64), r=4, bora_blocks=2, randomize=None)
    return {"base": llama_sharded, "adapter": adapter.path, "other": other.path}


@pytest.fixture
def work(tmp_path, pristine, fresh_copy):
    """Fresh copies of the inputs, and an empty directory for outputs."""
    paths = {k: fresh_copy(v, k) for k, v in pristine.items()}
    paths["outdir"] = tmp_path / "outdir"
    paths["outdir"].mkdir()
    return paths


COMMANDS = {
    "inspect": lambda w: ["inspect", w["adapter"]],
    "merge": lambda w: ["merge", w["adapter"], "--base", w["base"], "--out", w["outdir"] / "merged"],
    "to-lora": lambda w: ["to-lora", w["adapter"], "--out", w["outdir"] / "lora", "--rank", "full"],
    "gguf-lora": lambda w: ["export-gguf", w["adapter"], "--base", w["base"], "--out", w["outdir"] / "lora.gguf"],
    "gguf-merge": lambda w: [
        "export-gguf",
        w["adapter"],
        "--base",
        w["base"],
        "--merge",
        "--out",
        w["outdir"] / "m.gguf",
    ],
    "gguf-full": lambda w: ["export-gguf", w["base"], "--out", w["outdir"] / "base.gguf"],
}
READS_ADAPTER = ["inspect", "merge", "to-lora", "gguf-lora", "gguf-merge"]
READS_BASE = ["merge", "gguf-lora", "gguf-merge", "gguf-full"]
WRITES = ["merge", "to-lora", "gguf-lora", "gguf-merge", "gguf-full"]


def snapshot(work):
    return {
        k: sorted((p.relative_to(v), p.stat().st_size, p.stat().st_mtime_ns) for p in v.rglob("*"))
        for k, v in work.items()
    }


def assert_clean_failure(work, command, culprit, *, code=1):
    before = snapshot(work)
    result = CliRunner().invoke(cli, [str(a) for a in COMMANDS[command](work)])
    errors = [line for line in result.stderr.splitlines() if not line.startswith("Warning: ")]
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    assert culprit in errors[0], errors[0]
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    assert snapshot(work) == before  # inputs untouched, no output, no temporary leftovers
    return errors[0]


# -- the adapter ----------------------------------------------------------


def _rewrite_header(path, mutate):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _tensors(mutate):
    def apply(a):
        t = load_file(a / ST)
        mutate(t)
        save_file(t, a / ST)

    return apply


def _config(mutate):
    def apply(a):
        cfg = json.loads((a / "adapter_config.json").read_text())
        mutate(cfg)
        (a / "adapter_config.json").write_text(json.dumps(cfg))

    return apply


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bora-pwned",))


def _pickle(a):
    os.remove(a / ST)
    (a / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))


ADAPTER_CASES = {
    "header-length-lies": (lambda a: (a / ST).write_bytes(struct.pack("<Q", 10**9) + (a / ST).read_bytes()[8:]), ST),
    "truncated": (lambda a: (a / ST).write_bytes((a / ST).read_bytes()[:-100]), ST),
    "offsets-lie": (
        lambda a: _rewrite_header(a / ST, lambda h: h[Q + ".lora_A.weight"].update(data_offsets=[0, 10**7])),
        ST,
    ),
    "dtype-lies": (lambda a: _rewrite_header(a / ST, lambda h: h[Q + ".lora_A.weight"].update(dtype="F64")), ST),
    "nonsense-bytes": (lambda a: (a / ST).write_bytes(b"\x07" * 64), ST),
    "config-not-json": (lambda a: (a / "adapter_config.json").write_text("{'r': 4"), "adapter_config.json"),
    "config-lacks-r": (_config(lambda c: c.pop("r")), "adapter_config.json"),
    "config-wrong-type": (_config(lambda c: c.update(peft_type="LORA")), "peft_type"),
    "config-contradicts-tensors": (_config(lambda c: c.update(r=8, lora_alpha=8)), "q_proj.lora_A.weight"),
    "sigma-shape": (_tensors(lambda t: t.update({Q + ".bora_sigma": torch.ones(2, 2, 3)})), "q_proj.bora_sigma"),
    "factor-shapes-disagree": (
        _tensors(lambda t: t.update({Q + ".lora_B.weight": torch.ones(64, 3)})),
        "q_proj.lora_B.weight",
    ),
    "b-does-not-divide": (
        lambda a: (
            _config(lambda c: c.update(bora_blocks=3))(a),
            _tensors(lambda t: t.update({k: torch.ones(3, 3, 4) for k in list(t) if k.endswith("bora_sigma")}))(a),
        ),
        "bora_blocks b=3",
    ),
    "nan": (_tensors(lambda t: t[Q + ".lora_B.weight"].__setitem__((0, 0), math.nan)), "q_proj.lora_B.weight"),
    "inf": (_tensors(lambda t: t[Q + ".bora_sigma"].__setitem__((0, 0, 0), math.inf)), "q_proj.bora_sigma"),
    "missing-tensor": (_tensors(lambda t: t.pop(Q + ".lora_A.weight")), "q_proj.lora_A.weight"),
    "unknown-key": (_tensors(lambda t: t.update({"base_model.model.x.lora_Z.weight": torch.ones(1)})), "lora_Z.weight"),
    "legacy-pickle": (_pickle, "adapter_model.bin"),
    "no-weights": (lambda a: os.remove(a / ST), ST),
}


@pytest.mark.parametrize("command", READS_ADAPTER)
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter(work, case, command):
    mutate, culprit = ADAPTER_CASES[case]
    mutate(work["adapter"])
    assert_clean_failure(work, command, culprit)
    assert not os.path.exists("/tmp/bora-pwned")


# -- the base model -------------------------------------------------------


def _first_shard(b):
    return json.loads((b / INDEX_FILE).read_text())["weight_map"]["model.layers.0.self_attn.q_proj.weight"]


def _index(mutate):
    def apply(b):
        index = json.loads((b / INDEX_FILE).read_text())
        mutate(index["weight_map"], _first_shard(b))
        (b / INDEX_FILE).write_text(json.dumps(index))

    return apply


def _symlink_out(b):
    shard = b / _first_shard(b)
    outside = b.parent / "outside.safetensors"
    os.replace(shard, outside)
    os.symlink(outside, shard)


BASE_CASES = {
    "shard-outside": (
        _index(lambda wm, s: wm.update({"model.layers.0.self_attn.q_proj.weight": "../evil.safetensors"})),
        "'../evil.safetensors'",
    ),
    "absolute-shard": (
        _index(lambda wm, s: wm.update({"model.layers.0.self_attn.q_proj.weight": "/etc/passwd"})),
        "'/etc/passwd'",
    ),
    "missing-shard": (lambda b: os.remove(b / _first_shard(b)), "is missing"),
    "symlink-outside": (_symlink_out, "symlink leads outside"),
    "shard-header-lies": (
        lambda b: _rewrite_header(
            b / _first_shard(b), lambda h: h["model.layers.0.self_attn.q_proj.weight"].update(shape=[64, 65])
        ),
        "model.layers.0.self_attn.q_proj.weight",
    ),
    "shard-truncated": (
        lambda b: (b / _first_shard(b)).write_bytes((b / _first_shard(b)).read_bytes()[:-40]),
        "safetensors",
    ),
    "config-not-json": (lambda b: (b / "config.json").write_text("nope"), "config.json"),
    "index-not-json": (lambda b: (b / INDEX_FILE).write_text("{"), INDEX_FILE),
}


@pytest.mark.parametrize("command", READS_BASE)
@pytest.mark.parametrize("case", list(BASE_CASES))
def test_bad_base(work, case, command):
    mutate, culprit = BASE_CASES[case]
    mutate(work["base"])
    assert_clean_failure(work, command, culprit)


@pytest.mark.parametrize("command", ["merge", "gguf-lora", "gguf-merge"])
def test_adapter_for_another_base(work, command):
    shutil.rmtree(work["adapter"])
    shutil.copytree(work["other"], work["adapter"])
    assert_clean_failure(work, command, "another base model")


@pytest.mark.parametrize("command", WRITES)
def test_existing_output_is_refused_and_kept(work, command):
    target = COMMANDS[command](work)[COMMANDS[command](work).index("--out") + 1]
    (target.mkdir() if target.suffix != ".gguf" else target.write_text("precious"))
    assert_clean_failure(work, command, "already exists")


@pytest.mark.parametrize(
    "args,message",
    [
        (["to-lora", "{adapter}", "--out", "{out}", "--rank", "0"], "--rank"),
        (["to-lora", "{adapter}", "--out", "{out}", "--rank", "-3"], "--rank"),
        (["to-lora", "{adapter}", "--out", "{out}", "--energy", "1.5"], "--energy"),
        (["to-lora", "{adapter}", "--out", "{out}", "--energy", "0"], "--energy"),
        (["to-lora", "{adapter}", "--out", "{out}", "--rank", "many"], "--rank"),
        (["merge", "{adapter}", "--base", "{base}", "--out", "{out}", "--dtype", "int8"], "--dtype"),
        (["merge", "{adapter}", "--base", "{base}", "--out", "{out}", "--scale", "abc"], "--scale"),
        (["export-gguf", "{base}", "--out", "{out}.gguf", "--outtype", "q4_k"], "--outtype"),
        (["export-gguf", "{adapter}", "--base", "{base}", "--out", "{out}.gguf", "--rank", "0"], "--rank"),
        (["inspect", "{adapter}", "--device", "tpu"], "--device"),
    ],
)
def test_bad_option_values_are_usage_errors(work, args, message):
    argv = [a.format(adapter=work["adapter"], base=work["base"], out=work["outdir"] / "o") for a in args]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert not any(work["outdir"].iterdir())


def test_nan_scale_is_refused(work):
    result = CliRunner().invoke(
        cli,
        [
            "merge",
            str(work["adapter"]),
            "--base",
            str(work["base"]),
            "--out",
            str(work["outdir"] / "m"),
            "--scale",
            "nan",
        ],
    )
    assert result.exit_code != 0 and "--scale" in result.stderr and not any(work["outdir"].iterdir())
