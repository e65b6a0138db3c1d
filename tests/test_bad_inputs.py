"""Hostile inputs across every command: one `Error:` line naming the culprit, a
non-zero exit, no traceback, and nothing left behind.

The harness is cli_support.py (``work``, ``COMMANDS``, ``clean_failure``); a new case is one entry in a
table below: a function that spoils the copy of the adapter (or base), and the words the error names."""

import json
import math
import os
import pickle
import shutil
import struct

import pytest
import torch
from cli_support import (
    COMMANDS,
    READS_ADAPTER,
    READS_BASE,
    ST,
    WRITES,
    Q,
    clean_failure,
    config,
    first_shard,
    output_of,
    rewrite_header,
    run,
    tensors,
)

from bora_tools.io.model_dir import INDEX_FILE

# -- the adapter ----------------------------------------------------------


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
        lambda a: rewrite_header(a / ST, lambda h: h[Q + ".lora_A.weight"].update(data_offsets=[0, 10**7])),
        ST,
    ),
    "dtype-lies": (lambda a: rewrite_header(a / ST, lambda h: h[Q + ".lora_A.weight"].update(dtype="F64")), ST),
    "nonsense-bytes": (lambda a: (a / ST).write_bytes(b"\x07" * 64), ST),
    "config-not-json": (lambda a: (a / "adapter_config.json").write_text("{'r': 4"), "adapter_config.json"),
    "config-lacks-r": (config(lambda c: c.pop("r")), "adapter_config.json"),
    "config-wrong-type": (config(lambda c: c.update(peft_type="LORA")), "peft_type"),
    "config-contradicts-tensors": (config(lambda c: c.update(r=8, lora_alpha=8)), "q_proj.lora_A.weight"),
    "sigma-shape": (tensors(lambda t: t.update({Q + ".bora_sigma": torch.ones(2, 2, 3)})), "q_proj.bora_sigma"),
    "factor-shapes-disagree": (
        tensors(lambda t: t.update({Q + ".lora_B.weight": torch.ones(64, 3)})),
        "q_proj.lora_B.weight",
    ),
    "b-does-not-divide": (
        lambda a: (
            config(lambda c: c.update(bora_blocks=3))(a),
            tensors(lambda t: t.update({k: torch.ones(3, 3, 4) for k in list(t) if k.endswith("bora_sigma")}))(a),
        ),
        "bora_blocks b=3",
    ),
    "nan": (tensors(lambda t: t[Q + ".lora_B.weight"].__setitem__((0, 0), math.nan)), "q_proj.lora_B.weight"),
    "inf": (tensors(lambda t: t[Q + ".bora_sigma"].__setitem__((0, 0, 0), math.inf)), "q_proj.bora_sigma"),
    "missing-tensor": (tensors(lambda t: t.pop(Q + ".lora_A.weight")), "q_proj.lora_A.weight"),
    "unknown-key": (tensors(lambda t: t.update({"base_model.model.x.lora_Z.weight": torch.ones(1)})), "lora_Z.weight"),
    "legacy-pickle": (_pickle, "adapter_model.bin"),
    "no-weights": (lambda a: os.remove(a / ST), ST),
}


@pytest.mark.parametrize("command", READS_ADAPTER)
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter(work, case, command):
    spoil, culprit = ADAPTER_CASES[case]
    spoil(work["adapter"])
    clean_failure(work, command, culprit)
    assert not os.path.exists("/tmp/bora-pwned")


# -- the base model -------------------------------------------------------


def _index(mutate):
    def apply(b):
        index = json.loads((b / INDEX_FILE).read_text())
        mutate(index["weight_map"], first_shard(b).name)
        (b / INDEX_FILE).write_text(json.dumps(index))

    return apply


def _symlink_out(b):
    shard = first_shard(b)
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
    "missing-shard": (lambda b: os.remove(first_shard(b)), "is missing"),
    "symlink-outside": (_symlink_out, "symlink leads outside"),
    "shard-header-lies": (
        lambda b: rewrite_header(
            first_shard(b), lambda h: h["model.layers.0.self_attn.q_proj.weight"].update(shape=[64, 65])
        ),
        "model.layers.0.self_attn.q_proj.weight",
    ),
    "shard-truncated": (
        lambda b: first_shard(b).write_bytes(first_shard(b).read_bytes()[:-40]),
        "safetensors",
    ),
    "config-not-json": (lambda b: (b / "config.json").write_text("nope"), "config.json"),
    "index-not-json": (lambda b: (b / INDEX_FILE).write_text("{"), INDEX_FILE),
    "quantized": (  # a base saved by bitsandbytes (QLoRA): merge into the full-precision one instead
        config(lambda c: c.update(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
               "config.json"),
        "a quantized model (bitsandbytes); an adapter merges into full-precision weights (give the full-precision base",
    ),
}


@pytest.mark.parametrize("command", READS_BASE)
@pytest.mark.parametrize("case", list(BASE_CASES))
def test_bad_base(work, case, command):
    spoil, culprit = BASE_CASES[case]
    spoil(work["base"])
    clean_failure(work, command, culprit)


@pytest.mark.parametrize("command", ["merge", "gguf-lora", "gguf-merge"])
def test_adapter_for_another_base(work, pristine, command):
    shutil.rmtree(work["adapter"])
    shutil.copytree(pristine["other"], work["adapter"])
    clean_failure(work, command, "another base model")


@pytest.mark.parametrize("command", WRITES)
def test_existing_output_is_refused_and_kept(work, command):
    target = output_of(COMMANDS[command](work))
    (target.mkdir() if target.suffix != ".gguf" else target.write_text("precious"))
    clean_failure(work, command, "already exists")


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
    result = run(*argv)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output
    assert not any(work["outdir"].iterdir())


def test_nan_scale_is_refused(work):
    result = run("merge", work["adapter"], "--base", work["base"], "--out", work["outdir"] / "m", "--scale", "nan")
    assert result.exit_code != 0 and "--scale" in result.stderr and not any(work["outdir"].iterdir())
