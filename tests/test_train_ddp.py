"""`bora-tools train` under torchrun: two processes (gloo on the CPU) train the adapter one process trains on the
same global batch; only rank 0 writes, and what it writes is complete.

Tolerance: DDP sums the two halves' gradients in another order than one process sums the whole batch, so the
gradients differ by float32 rounding (~1e-7 relative). AdamW divides each gradient by its own running magnitude,
which turns that into up to ~1e-5 on elements whose gradient is near zero: measured 1.2e-5 (max abs) after 4 steps
at lr 1e-2. The bound, 1e-4, is 1% of one step's update; the control (other batches, same everything else)
differs by more than 1e-3, so a process that saw the wrong data or skipped the gradient average cannot pass.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import run
from test_train_report import assert_same, scalars

from bora_tools.core.adapter import load_adapter
from bora_tools.demo.tiny import TEXT, build_model, build_tokenizer, save_model_dir

pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow  # torchrun starts two processes
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4


def train_args(base, data, out, batch_size):
    return ["train", "--base", str(base), "--data", str(data), "--out", str(out), "-r", "4", "--blocks", "2",
            "--max-steps", "4", "--lr", "1e-2", "--batch-size", str(batch_size), "--device", "cpu",
            "--logging-steps", "1"]


def max_difference(a, b):
    a, b = load_adapter(a).state_dict(), load_adapter(b).state_dict()
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_processes_train_the_adapter_one_process_trains(tmp_path):
    base = save_model_dir(build_model("llama"), tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "one-tok")  # the files a tokenizer saves: OUT holds them too
    records = [{"text": line} for line in TEXT.splitlines() if line.strip()][:7]
    records.append({"prompt": "Q: what jumps? A:", "completion": " the quick brown fox"})
    data = tmp_path / "data.jsonl"  # 8 records: whole global batches of 4, no padded last batch
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bora_tools.cli", *train_args(base, data, tmp_path / "two", 2), "--save-steps", "2", "--json"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one report: rank 1 printed nothing
    assert (report["processes"], report["global_batch"], report["steps"]) == (2, 4, 4)
    assert proc.stderr.count("step 1/4 ") == 1  # the loss lines come from rank 0 alone

    # Complete and atomic: the adapter and the base's tokenizer files, no temporary sibling left by either rank.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", *(p.name for p in (tmp_path / "one-tok").iterdir())])
    assert not [p.name for p in tmp_path.iterdir() if ".bora-tmp-" in p.name]
    for step in (2, 4):  # checkpoints written once, by rank 0, adapter-only
        ckpt = tmp_path / "two-checkpoints" / f"checkpoint-{step}"
        assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()

    torch.set_num_threads(1)
    try:
        for out, batch in (("one", 4), ("control", 2)):
            result = run(*train_args(base, data, tmp_path / out, batch), "--quiet")
            assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert max_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    assert max_difference(tmp_path / "one", tmp_path / "control") > 1e-3


def test_two_processes_evaluate_and_pack_together(tmp_path):
    """The eval loss (every 2 steps and at the end: collective calls on both ranks) and packed batches under
    torchrun: one report with the eval loss, no rank left waiting; the tensorboard event file written by rank 0
    alone."""
    base = save_model_dir(build_model("llama"), tmp_path / "base")
    records = [{"text": line} for line in TEXT.splitlines() if line.strip()]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bora_tools.cli", "train", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "two"),
         "-r", "4", "--blocks", "2", "--max-steps", "3", "--batch-size", "1", "--device", "cpu",
         "--eval-fraction", "0.3", "--eval-steps", "2", "--packing", "--max-length", "128", "--json",
         "--logging-steps", "1", "--report-to", "tensorboard"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["processes"] == 2 and [s for s, _ in report["eval_losses"]] == [2, 3]
    assert proc.stderr.count("eval loss") == 2  # logged by rank 0 alone
    assert "gemm_4bit" not in proc.stderr  # bitsandbytes' kernel noise kept off every rank's stderr
    # --report-to tensorboard: one event file, written by rank 0, in OUT-checkpoints/runs/DATE_HOST
    runs = list((tmp_path / "two-checkpoints" / "runs").iterdir())
    assert len(runs) == 1 and len(list(runs[0].iterdir())) == 1 and report["logging_dir"] == str(runs[0])
    found = scalars(runs[0])
    assert_same(report["losses"], found["train/loss"])
    assert_same(report["eval_losses"], found["eval/loss"])
