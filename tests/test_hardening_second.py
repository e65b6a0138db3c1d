"""Hardening, second pass (issue 23, items 1, 4 (long names), 5, 8 and 9): revisions that would write
outside the cache, downloads limited to what a command reads, JSONL split on ``\\n`` only, signals and
timeouts during Hub downloads, quantizing and training, ``train --overwrite``, ``-r`` above a module's
dimensions, FIFOs as ``--data``, one file mode for every output, and names over 255 bytes.

Each refusal goes through the bad-input harness (``cli_support.clean_failure``): one ``Error:`` line naming
the culprit, exit 1, no traceback, inputs untouched and nothing written.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cli_support import COMMANDS, WRITES, clean_failure, output_of, run
from hub_server import FakeHub

from bora_tools.io.hub_input import resolve_input, revision_problem
from bora_tools.training.data import read_records

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["-r", 2, "--blocks", 2, "--max-steps", 1, "--batch-size", 2]


def _train(work, *extra, out=None, data=None):
    data = data or work["datadir"] / "d.jsonl"
    return ["train", "--base", work["base"], "--data", data, "--out", out or work["outdir"] / "t", *TRAIN, *extra]


@pytest.fixture
def twork(work):
    """``work`` plus ``datadir``, an input folder holding ``d.jsonl``, a few text records."""
    folder = work["outdir"].parent / "data"
    folder.mkdir()
    (folder / "d.jsonl").write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(4)))
    work["datadir"] = folder
    return work


# -- 1. revisions: only git ref names and commit ids; only the files a command reads -----------------------------


@pytest.mark.parametrize("rev", ["main", "v1.0", "refs/pr/1", "feature/x-y_z", "a" * 40, "0123456789abcdef" * 4])
def test_branch_tag_and_commit_revisions_are_accepted(rev):
    assert revision_problem(rev) is None


@pytest.mark.parametrize("rev", ["/abs/path/notes.txt", ".", "..", "a/../b", "a/./b", ".hidden", "a//b", "a/",
                                 "x.lock", "a\x01b", "a b", "x" * 201, "a@{1}", "@", "a~1", "a:b"])
def test_revisions_git_would_refuse_are_refused(rev):
    assert revision_problem(rev)


def test_a_revision_that_is_a_path_writes_nothing_outside_the_cache(work):
    victim = work["adapter"] / "notes.txt"
    victim.write_text("my notes")
    line = clean_failure(work, ["inspect", f"me/ad@{victim}"], "me/ad@", "not a branch, tag or commit id")
    assert "begins with '/'" in line and victim.read_text() == "my notes"
    clean_failure(work, ["inspect", "me/ad@."], "revision '.'")
    clean_failure(work, ["merge", work["adapter"], "--base", "me/base@x.lock", "--out", work["outdir"] / "m"],
                  "revision 'x.lock'")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from bora_tools.core.config import BoraConfig
    from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
    from bora_tools.training import add_bora, randomize_bora, save_bora

    root = tmp_path_factory.mktemp("hub")
    model = build_model("llama")
    base = save_model_dir(model, root / "base")
    add_bora(model, BoraConfig(r=2, bora_blocks=2, target_modules=default_targets("llama")))
    randomize_bora(model, seed=1)
    adapter = save_bora(model, root / "bora")

    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    with FakeHub() as server:
        hostile = {"../config.json": b"{}", "../../escape.txt": b"x", "huge.tiktoken": b"\0" * (1 << 20),
                   "sub/config.json": b"{}", "../adapter_config.json": b"{}"}
        server.seed("org/base", {**files(base), **hostile})
        server.seed("org/bora", {**files(adapter), **hostile})
        yield server


def test_only_the_files_the_input_kind_reads_are_downloaded(hub, tmp_path):
    hub.requests.clear()
    found = resolve_input("org/base", kind="model", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert "config.json" in found.files and "model.safetensors" in found.files
    fetched = set(hub.downloaded())
    assert fetched == set(found.files), fetched
    assert not any(".." in f or f.endswith(".tiktoken") or "/" in f for f in fetched), fetched
    adapter = resolve_input("org/bora", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    assert set(adapter.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "config.json").exists()


def test_an_offline_run_finds_what_an_online_run_fetched(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    online = resolve_input("org/bora@main", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    offline = resolve_input("org/bora@main", kind="adapter", endpoint=hub.endpoint, cache_dir=tmp_path)
    assert offline.path == online.path and offline.commit == hub.head("org/bora") and hub.requests == []


# -- 4. names over 255 bytes ---------------------------------------------------------------------------------------

LONG = "x" * 300


@pytest.mark.parametrize("command", WRITES)
def test_an_output_name_over_255_bytes_is_one_line(work, command):
    argv = COMMANDS[command](work)
    out = output_of(argv)
    argv[argv.index(out)] = out.parent / (LONG + out.suffix)
    clean_failure(work, argv, "is 30", "bytes long", "at most 255")


@pytest.mark.parametrize("spec", [LONG, f"me/{LONG}", f"me/ad@{LONG}", f"{LONG}/adapter"])
def test_an_input_name_over_255_bytes_is_one_line(work, spec):
    clean_failure(work, ["inspect", spec], "bytes long")


def test_train_names_over_255_bytes_are_one_line(twork):
    long_data = twork["datadir"] / ("d" * 300 + ".jsonl")
    clean_failure(twork, _train(twork, data=long_data), "--data", "306 bytes long")
    clean_failure(twork, _train(twork, out=twork["outdir"] / ("t" * 300)), "output", "300 bytes long")
    # A valid 255-byte OUT whose checkpoint directory (OUT-checkpoints) would not be:
    line = clean_failure(twork, _train(twork, "--save-steps", 1, out=twork["outdir"] / ("t" * 255)),
                         "checkpoint directory made from --out", "267 bytes long")
    assert "Error: " in line


# -- 5. JSONL: records end at \n only ------------------------------------------------------------------------------


def test_jsonl_lines_end_at_newline_only(tmp_path):
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0bh\x0ci\x1cj\x1dk\x1el"]
    path = tmp_path / "d.jsonl"
    path.write_bytes("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode())
    records = read_records(path)
    assert [r.line for r in records] == [1, 2, 3, 4] and [r.fields["text"] for r in records] == texts
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [r.fields["text"] for r in read_records(crlf)] == ["a", "b"]


def test_a_bad_line_after_separators_is_named_by_its_line_in_the_file(twork):
    rows = [json.dumps({"text": "one\u2028two\u2029three\x85four"}, ensure_ascii=False), "{broken", "{}"]
    (twork["datadir"] / "d.jsonl").write_bytes(("\n".join(rows) + "\n").encode())
    line = clean_failure(twork, _train(twork), "line 2: not valid JSON", "line 3")
    assert "line 1" not in line


# -- 9. --overwrite, -r, --data that is not a regular file, file modes ---------------------------------------------


def test_overwrite_leaves_a_folder_that_is_not_ours(twork):
    out = twork["outdir"] / "t"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    clean_failure(twork, _train(twork, "--overwrite", out=out), "--overwrite", "thesis.tex", "not a BoRA adapter")
    (out / "thesis.tex").unlink()
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    clean_failure(twork, _train(twork, "--overwrite", out=out), "has no BoRA adapter_config.json")


def test_overwrite_leaves_a_checkpoint_that_holds_other_data(twork):
    checkpoint = twork["outdir"] / "t-checkpoints" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / "results.csv").write_text("1,2,3")
    clean_failure(twork, _train(twork, "--save-steps", 1, "--overwrite"), "checkpoint-7", "results.csv")


@pytest.mark.slow
def test_overwrite_replaces_an_adapter_we_wrote_and_our_checkpoints(twork):
    out = twork["outdir"] / "t"
    first = run(*_train(twork, "--save-steps", 1, "--quiet"))
    assert first.exit_code == 0, first.output
    again = run(*_train(twork, "--save-steps", 1, "--overwrite", "--quiet", "-r", 4, "--blocks", 2))
    assert again.exit_code == 0, again.output
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_a_rank_above_a_modules_dimensions_is_refused(twork):
    clean_failure(twork, _train(twork, "-r", 100000), "-r 100000", "larger than the dimensions", "min(m, n)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_data_is_refused_as_not_a_regular_file(twork):
    fifo = twork["datadir"] / "pipe.jsonl"
    os.mkfifo(fifo)
    clean_failure(twork, _train(twork, data=fifo), "--data", "pipe.jsonl", "FIFO", "not a regular file")


def test_dev_stdin_as_data_is_refused_as_not_a_regular_file(twork):
    r, w = os.pipe()
    try:
        result = subprocess.run([sys.executable, "-m", "bora_tools.cli", *map(str, _train(twork, data="/dev/stdin"))],
                                stdin=r, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    finally:
        os.close(r)
        os.close(w)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "/dev/stdin: a FIFO or pipe, not a regular file" in lines[0], result.stderr


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_output_file_has_the_same_umask_mode(work, mask):
    old = os.umask(mask)
    try:
        for command in ("merge", "to-lora"):
            assert run(*COMMANDS[command](work), "--quiet").exit_code == 0
        from bora_tools.core.config import BoraConfig
        from bora_tools.demo.tiny import build_model
        from bora_tools.training import add_bora, save_bora

        model = add_bora(build_model("llama"), BoraConfig(r=2, bora_blocks=2, target_modules=["q_proj"]))
        save_bora(model, work["outdir"] / "saved")
    finally:
        os.umask(old)
    modes = {p.relative_to(work["outdir"]).as_posix(): p.stat().st_mode & 0o777
             for p in work["outdir"].rglob("*") if p.is_file()}
    assert "saved/adapter_model.safetensors" in modes and "lora/adapter_model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~mask}, modes


# -- 8. signals and timeouts -------------------------------------------------------------------------------------


def _hub_env(hub, home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                  "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


@pytest.fixture
def stalling_hub(hub):
    hub.stalled.clear()
    yield hub
    hub.stalls.clear()


@pytest.mark.slow
def test_sigterm_during_a_slow_download_exits_at_once(stalling_hub, tmp_path):
    stalling_hub.stall("resolve", 60)
    proc = subprocess.Popen([sys.executable, "-m", "bora_tools.cli", "inspect", "org/bora"], cwd=REPO_ROOT,
                            env=_hub_env(stalling_hub, tmp_path / "home", HF_HUB_DOWNLOAD_TIMEOUT="120",
                                         HF_HUB_ETAG_TIMEOUT="120"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert stalling_hub.stalled.wait(60), proc.communicate(timeout=5)
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert time.monotonic() - start < 5, "the process did not stop promptly"
    assert proc.returncode == 143 and err.strip().splitlines() == ["Error: terminated; nothing was written"], err


@pytest.mark.slow
@pytest.mark.parametrize("route,method", [("repo_info", "GET"), ("resolve", "HEAD"), ("resolve", "GET")])
def test_a_hub_that_does_not_answer_times_out_in_one_line(stalling_hub, tmp_path, route, method):
    stalling_hub.stall(route, 30, method=method)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bora_tools.cli", "inspect", "org/bora"], cwd=REPO_ROOT,
                            env=_hub_env(stalling_hub, tmp_path / "home", HF_HUB_DOWNLOAD_TIMEOUT="1",
                                         HF_HUB_ETAG_TIMEOUT="1"),
                            capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 45  # a stalled download: huggingface_hub's five retries with backoff (~20 s)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: the Hub at") and "did not answer within the timeout" in lines[0], lines


_SLOW_QUANTIZER = textwrap.dedent("""
    import atexit, os, sys, tempfile, threading, time
    import llama_cpp
    real = llama_cpp.llama_model_quantize

    def slow_start(src, dst, params):  # llama.cpp that has not yet created its output when the signal comes
        held = os.path.join(tempfile.mkdtemp(), "input.gguf")  # its input stays readable after the cleanup
        os.link(src.decode(), held)
        print("READY", flush=True)
        time.sleep(1.0)
        return real(held.encode(), dst, params)

    llama_cpp.llama_model_quantize = slow_start

    def wait_for_llama_cpp():  # let it try to write before the process ends
        for t in threading.enumerate():
            if t.name == "bora-llama-quantize":
                t.join(30)

    atexit.register(wait_for_llama_cpp)
    from bora_tools.cli import main
    sys.argv[0] = "bora-tools"
    main()
""")


@pytest.mark.slow
def test_sigterm_early_in_quantizing_leaves_nothing_and_prints_one_line(work):
    pytest.importorskip("llama_cpp")
    argv = ["export-gguf", work["base"], "--out", work["outdir"] / "q.gguf", "--outtype", "Q4_K_M", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_QUANTIZER, *map(str, argv)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert list(work["outdir"].iterdir()) == []  # llama.cpp's output could not appear after the cleanup
    assert err.strip().splitlines() == ["Error: terminated; nothing was written"], err  # no llama.cpp line after it


_HELD_TRAINING = textwrap.dedent("""
    import sys, time
    from bora_tools.training import guards
    made = guards.kept_checkpoints

    def held(out):
        callback = made(out)
        on_save = callback.on_save

        def on_save_then_wait(args, state, control, **kwargs):
            on_save(args, state, control, **kwargs)
            print("READY", flush=True)
            time.sleep(60)

        callback.on_save = on_save_then_wait
        return callback

    guards.kept_checkpoints = held
    from bora_tools.cli import main
    sys.argv[0] = "bora-tools"
    main()
""")


@pytest.mark.slow
def test_sigterm_during_training_names_the_complete_checkpoint_and_the_missing_out(twork):
    out = twork["outdir"] / "t"
    argv = _train(twork, "--save-steps", 1, "--quiet", out=out)
    argv[argv.index("--max-steps") + 1] = 50
    proc = subprocess.Popen([sys.executable, "-c", _HELD_TRAINING, *map(str, argv)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.strip().splitlines() if line.startswith("Error: ")]
    assert proc.returncode == 143 and len(lines) == 1 and err.strip().endswith(lines[0]), err
    checkpoint = twork["outdir"] / "t-checkpoints" / "checkpoint-1"
    assert lines[0] == (f"Error: terminated: the checkpoint {checkpoint} is complete (continue with --resume), "
                        f"and {out} was not written"), lines
    assert (checkpoint / "trainer_state.json").is_file() and not out.exists()
