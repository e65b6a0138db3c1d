"""`train --report-to tensorboard` (issue 21): the event files, read back with TensorBoard's own reader, hold the
run's logged losses, learning rates and eval losses; bad inputs one line each; and a command's stderr holds no
bitsandbytes noise (its optional CPU kernel that cannot be fetched)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import clean_failure, run
from train_support import jsonl, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from bora_tools.demo.tiny import TEXT

pytest.importorskip("accelerate")
REPO = Path(__file__).resolve().parents[1]
RECORDS = [{"text": line} for line in TEXT.splitlines() if line.strip()]


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``directory``, as TensorBoard reads them: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same(logged: list[tuple[int, float]], written: list[tuple[int, float]]) -> None:
    """The same steps and, within float32 rounding (TensorBoard stores float32), the same values."""
    assert [s for s, _ in written] == [s for s, _ in logged], (written, logged)
    assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6), (written, logged)


@pytest.mark.slow
def test_tensorboard_holds_the_runs_losses_learning_rates_and_eval_losses(tmp_path, llama_base):
    pytest.importorskip("tensorboard")
    data, logs, out = jsonl(tmp_path / "data.jsonl", RECORDS), tmp_path / "tb", tmp_path / "out"
    result = run("train", "--base", llama_base, "--data", data, "--out", out, "-r", 4, "--blocks", 2,
                 "--lr", 1e-2, "--batch-size", 2, "--max-steps", 4, "--logging-steps", 1, "--eval-fraction", 0.3,
                 "--eval-steps", 2, "--report-to", "tensorboard", "--logging-dir", logs, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --quiet: not a line, from us or from a library
    report = json.loads(result.stdout)
    assert report["logging_dir"] == str(logs)
    assert [p.name.startswith("events.out.tfevents.") for p in logs.iterdir()] == [True]  # straight into it
    assert not (tmp_path / "out-checkpoints").exists()  # a logging dir given: nothing under OUT-checkpoints

    found = scalars(logs)
    assert len(report["losses"]) == 4 and len(report["eval_losses"]) == 2
    assert_same(report["losses"], found["train/loss"])
    assert_same(report["eval_losses"], found["eval/loss"])
    # linear decay from --lr, no warmup: the rate of step k is lr * (1 - (k - 1) / max_steps)
    assert_same([(k, 1e-2 * (1 - (k - 1) / 4)) for k in (1, 2, 3, 4)], found["train/learning_rate"])


def test_without_report_to_nothing_is_written_for_tensorboard(tmp_path, llama_base):
    data, out = jsonl(tmp_path / "data.jsonl", RECORDS), tmp_path / "out"
    result = run("train", "--base", llama_base, "--data", data, "--out", out, "-r", 4, "--blocks", 2,
                 "--max-steps", 1, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["logging_dir"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out"]  # no OUT-checkpoints/runs


# -- bad inputs -----------------------------------------------------------------------------------------------


def _cases(work, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("")
    out = work["outdir"] / "a"
    return {
        "dir_without_report_to": (["--logging-dir", tmp_path / "tb"], ["--logging-dir", "--report-to tensorboard"]),
        "dir_in_out": (["--report-to", "tensorboard", "--logging-dir", out / "runs"], ["--logging-dir", "overlap"]),
        "dir_holds_out": (["--report-to", "tensorboard", "--logging-dir", work["outdir"]],
                          ["--logging-dir", "overlap"]),
        "dir_in_base": (["--report-to", "tensorboard", "--logging-dir", work["base"] / "runs"],
                        ["--logging-dir", "inside the input"]),
        "dir_under_a_file": (["--report-to", "tensorboard", "--logging-dir", afile / "runs"],
                             ["--logging-dir", "is a file"]),
    }


@pytest.mark.parametrize("case", ["dir_without_report_to", "dir_in_out", "dir_holds_out",
                                  "dir_in_base", "dir_under_a_file"])
def test_each_bad_input_is_one_line(work, tmp_path, case):
    pytest.importorskip("tensorboard")  # the checks after the one for tensorboard itself
    extra, culprits = _cases(work, tmp_path)[case]
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    argv = ["train", "--base", work["base"], "--data", data, "--out", work["outdir"] / "a", "-r", 4,
            "--blocks", 2, "--max-steps", 1, *extra]
    clean_failure(work, argv, *culprits)


def test_report_to_names_its_choices():  # on the command line, click's choice; from Python or a config file, this
    from bora_tools.training import TrainOptions

    assert TrainOptions(report_to="wandb").problems() == [
        "`report_to`: expected one of none, tensorboard, found 'wandb'"]


def test_tensorboard_missing_is_one_line_naming_the_extra(work, tmp_path, monkeypatch):
    for name in ("tensorboard", "tensorboardX"):  # what transformers' is_tensorboard_available looks for
        monkeypatch.setitem(sys.modules, name, None)
    data = jsonl(tmp_path / "d.jsonl", RECORDS)
    clean_failure(work, ["train", "--base", work["base"], "--data", data, "--out", work["outdir"] / "a",
                         "--max-steps", 1, "--report-to", "tensorboard"],
                  "--report-to tensorboard", "not installed", "pip install 'bora-tools[tensorboard]'")


# -- stderr: bitsandbytes' kernel noise -----------------------------------------------------------------------


#: ``bora-tools ARGS`` in a fresh interpreter; after the command, one more line on stdout: was bitsandbytes imported
DRIVER = """
import sys
from bora_tools.cli import main
sys.argv = ["bora-tools", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
print("bitsandbytes imported:", "bitsandbytes" in sys.modules)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "verify"])
def test_a_command_run_fresh_prints_nothing_on_stderr_when_quiet(tmp_path, llama_base, command):
    """A fresh interpreter, as a user runs it: bitsandbytes (the qlora extra, installed here) is imported during
    `train` (by transformers' Trainer) and `verify` of a LoRA (by PEFT), and logs at import, on CPUs with
    AVX512-BF16, that it could not fetch an optional kernel from kernels-community (offline, or an untrusted
    repository). With --quiet, stderr stays empty."""
    pytest.importorskip("bitsandbytes")
    data = jsonl(tmp_path / "data.jsonl", RECORDS)
    trained = ["train", "--base", llama_base, "--data", data, "-r", 4, "--blocks", 2, "--max-steps", 1, "--quiet"]
    if command == "train":
        argv = [*trained, "--out", tmp_path / "out"]
    else:
        for made in (run(*trained, "--out", tmp_path / "adapter"),
                     run("to-lora", tmp_path / "adapter", "--out", tmp_path / "lora", "--quiet")):
            assert made.exit_code == 0, made.output
        argv = ["verify", tmp_path / "lora", "--adapter", tmp_path / "adapter", "--base", llama_base, "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", DRIVER, *map(str, argv)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "bitsandbytes imported: True"  # else this would prove nothing
    assert proc.stderr == ""


def test_the_command_line_keeps_bitsandbytes_warnings_and_shows_its_errors():
    """Independent of the CPU: once the command line has started, a warning from any bitsandbytes logger (the
    kernel one is ``bitsandbytes.backends.cpu.ops``) is dropped, and an error still passes."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)  # as in a fresh interpreter
    assert run("inspect", "--help").exit_code == 0  # the group has started
    kernel = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not kernel.isEnabledFor(logging.WARNING) and kernel.isEnabledFor(logging.ERROR)
