"""Crash safety: SIGKILL mid-write and a write that fails midway leave nothing that looks complete."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from bora_tools.config import BoraConfig
from bora_tools.tiny import build_model, default_targets, save_model_dir
from bora_tools.training import add_bora, randomize_bora, save_bora

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses Linux signals and rlimits")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A base of ~40 MB (float32) so that writing takes long enough to be interrupted."""
    root = tmp_path_factory.mktemp("crash")
    model = build_model("llama", hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1024)
    base = save_model_dir(model, root / "base", max_shard_size="10MB")
    add_bora(model, BoraConfig(r=4, bora_blocks=4, target_modules=default_targets("llama")))
    randomize_bora(model)
    adapter = save_bora(model, root / "adapter")
    return base, adapter


def commands(base, adapter, out):
    return {
        "merge": ["merge", str(adapter), "--base", str(base), "--out", str(out)],
    }


def cli(*args):
    return [sys.executable, "-m", "bora_tools.cli", *args, "--quiet"]


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.bora-tmp-"))


@pytest.mark.parametrize("command", ["merge"])
def test_sigkill_mid_write_leaves_nothing_that_looks_complete(tmp_path, inputs, command):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(*commands(*inputs, out)[command]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path, "out") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the command finished before it could be killed"
    assert not out.exists()
    assert leftovers(tmp_path, "out")  # the partial output is hidden, not at the target
    # the next run is not confused by the leftover, and cleans it up
    done = subprocess.run(cli(*commands(*inputs, out)[command]), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.exists() and not leftovers(tmp_path, "out")


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))  # 2 MB: the first big shard fails


@pytest.mark.parametrize("command", ["merge"])
def test_write_failing_midway_gives_a_clear_error_and_no_output(tmp_path, inputs, command):
    out = tmp_path / "out"
    proc = subprocess.run(cli(*commands(*inputs, out)[command]), capture_output=True, text=True,
                          preexec_fn=_limit_file_size)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "file too large" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not leftovers(tmp_path, "out")
