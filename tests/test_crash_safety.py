"""Crash safety: SIGKILL mid-write, SIGKILL just before the final rename, and a
write that fails midway leave nothing at the target that looks complete."""

import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = [pytest.mark.slow,  # every test runs and kills a command in a subprocess
              pytest.mark.skipif(sys.platform != "linux", reason="uses Linux signals and rlimits")]


LARGE = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1024)


@pytest.fixture(scope="module")
def inputs(tiny):
    """A base of ~40 MB (float32) so that writing takes long enough to be interrupted."""
    base = tiny.base("llama", max_shard_size="10MB", **LARGE)
    return base, tiny.adapter("llama", model_kwargs=LARGE, r=4, bora_blocks=4).path


def argv(command, base, adapter, out):
    return {
        "merge": ["merge", adapter, "--base", base, "--out", out],
        "to-lora": ["to-lora", adapter, "--out", out, "--rank", "full"],
        "gguf-full": ["export-gguf", base, "--out", out, "--outtype", "f32"],
        "gguf-merge": ["export-gguf", adapter, "--base", base, "--merge", "--out", out, "--outtype", "f32"],
        "gguf-lora": ["export-gguf", adapter, "--base", base, "--out", out],
    }[command]


def cli(*args):
    return [sys.executable, "-m", "bora_tools.cli", *map(str, args), "--quiet"]


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.bora-tmp-"))


def rerun_cleans_up(tmp_path, inputs, command, out):
    done = subprocess.run(cli(*argv(command, *inputs, out)), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.exists() and not leftovers(tmp_path, out.name)


@pytest.mark.parametrize("command", ["merge", "gguf-full", "gguf-merge"])
def test_sigkill_mid_write_leaves_nothing_that_looks_complete(tmp_path, inputs, command):
    out = tmp_path / "out"
    proc = subprocess.Popen(cli(*argv(command, *inputs, out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not leftovers(tmp_path, "out") and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the command finished before it could be killed"
    assert not out.exists()
    assert leftovers(tmp_path, "out")  # the partial output is hidden, not at the target
    rerun_cleans_up(tmp_path, inputs, command, out)  # not confused by the leftover, and removes it


# Runs the CLI with the final rename held back: the output is complete in its
# temporary sibling, and the process says so and waits to be killed.
_HOLD_BEFORE_RENAME = textwrap.dedent("""
    import sys, time
    import bora_tools.io.atomic as output
    def held(tmp, target, **kw):
        print("READY", flush=True)
        time.sleep(600)
    output._commit = held
    from bora_tools.cli import cli
    cli(sys.argv[1:], prog_name="bora-tools")
""")


@pytest.mark.parametrize("command", ["merge", "to-lora", "gguf-full", "gguf-lora"])
def test_sigkill_before_the_final_rename(tmp_path, inputs, command):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_BEFORE_RENAME, *map(str, argv(command, *inputs, out)), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and leftovers(tmp_path, "out")
    rerun_cleans_up(tmp_path, inputs, command, out)


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # every output here is larger


@pytest.mark.parametrize("command", ["merge", "to-lora", "gguf-full", "gguf-merge", "gguf-lora"])
def test_write_failing_midway_gives_a_clear_error_and_no_output(tmp_path, inputs, command):
    out = tmp_path / "out"
    proc = subprocess.run(
        cli(*argv(command, *inputs, out)), capture_output=True, text=True, preexec_fn=_limit_file_size
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "file too large" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not leftovers(tmp_path, "out")
