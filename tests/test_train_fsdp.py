"""`bora-tools train --fsdp` under torchrun: FSDP2 (`fully_shard` per decoder layer) over two processes (gloo on the
CPU) trains the adapter one process trains on the same global batch; checkpoints hold the whole adapter, gathered
from both shards, written by rank 0 alone; a resumed run ends where an uninterrupted one ends.

Tolerance, as in test_train_ddp.py: the two processes' gradients are reduce-scattered and averaged in another order
than one process sums the whole batch (float32 rounding, ~1e-7 relative), which AdamW turns into up to ~1e-5 on
elements whose gradient is near zero. The bound, 1e-4, is 1% of one step's update; the control (other batches, same
everything else) differs by more than 1e-3, so a process that saw the wrong data, a gradient not averaged, or a
checkpoint holding one shard cannot pass.

Only rank 0 writes: an audit hook (a sitecustomize on the processes' path) records every rename made by each rank,
which is how every file of OUT and of a checkpoint's adapter is put in place (atomically).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_support import run

from bora_tools.core.adapter import load_adapter
from bora_tools.demo.tiny import TEXT, build_model, save_model_dir

pytest.importorskip("accelerate")
REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
AUDIT = """\
import os
import sys

_LOG = os.environ.get("BORA_RENAME_LOG")
if _LOG:
    def _renames(event, args):
        if event == "os.rename":
            with open(f"{_LOG}.rank{os.environ.get('RANK', '-')}", "a") as f:
                f.write(f"{os.fspath(args[1])}\\n")
    sys.addaudithook(_renames)
"""


def train_args(base, data, out, batch_size, *extra):
    return ["train", "--base", str(base), "--data", str(data), "--out", str(out), "-r", "4", "--blocks", "2",
            "--max-steps", "4", "--lr", "1e-2", "--batch-size", str(batch_size), "--device", "cpu",
            "--logging-steps", "1", *map(str, extra)]


def adapter_difference(a, b):
    a, b = load_adapter(a).state_dict(), load_adapter(b).state_dict()
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    base = save_model_dir(build_model("llama"), root / "base")
    records = [{"text": line} for line in TEXT.splitlines() if line.strip()][:7]
    records.append({"prompt": "Q: what jumps? A:", "completion": " the quick brown fox"})
    data = root / "data.jsonl"  # 8 records: whole global batches of 4, no padded last batch
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    audit = root / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    return base, data, audit


def torchrun(inputs, cwd, *args, log=None):
    _, _, audit = inputs
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(audit), str(REPO), os.environ.get("PYTHONPATH", "")])}
    if log is not None:
        env["BORA_RENAME_LOG"] = str(log)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bora_tools.cli", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def one_process(*args):
    torch.set_num_threads(1)
    try:
        result = run(*args, "--quiet")
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_fsdp_over_two_processes_trains_the_adapter_one_process_trains(tmp_path, inputs):
    base, data, _ = inputs
    proc = torchrun(inputs, tmp_path, *train_args(base, data, tmp_path / "two", 2, "--fsdp", "--save-steps", 2,
                                                  "--json"), log=tmp_path / "renames")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one report: rank 1 printed nothing
    assert (report["processes"], report["global_batch"], report["steps"]) == (2, 4, 4)
    assert proc.stderr.count("step 1/4 ") == 1  # the loss lines come from rank 0 alone

    one_process(*train_args(base, data, tmp_path / "one", 4))
    one_process(*train_args(base, data, tmp_path / "control", 2))
    assert adapter_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE
    assert adapter_difference(tmp_path / "one", tmp_path / "control") > 1e-3

    # OUT is the adapter (and the base's tokenizer files), complete, as one process writes it; no temporary
    # sibling left by either rank.
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= set(written)
    config = "adapter_config.json"
    assert (tmp_path / "two" / config).read_text() == (tmp_path / "one" / config).read_text()
    assert not [p.name for p in tmp_path.rglob("*") if ".bora-tmp-" in p.name]
    # Every checkpoint holds every adapter tensor at full shape (not one rank's shard), and resumes.
    full = {k: tuple(t.shape) for k, t in load_adapter(tmp_path / "one").state_dict().items()}
    for step in (2, 4):
        ckpt = tmp_path / "two-checkpoints" / f"checkpoint-{step}"
        assert {k: tuple(t.shape) for k, t in load_adapter(ckpt).state_dict().items()} == full
        assert (ckpt / "optimizer.pt").is_file() and not (ckpt / "model.safetensors").exists()
    assert adapter_difference(tmp_path / "two-checkpoints" / "checkpoint-4", tmp_path / "two") == 0.0

    # Only rank 0 put files in place: OUT once, each checkpoint's adapter, optimizer and scheduler.
    by_rank0 = (tmp_path / "renames.rank0").read_text().splitlines()
    by_rank1 = (tmp_path / "renames.rank1").read_text().splitlines() if (tmp_path / "renames.rank1").exists() else []
    assert not [p for p in by_rank1 if p.startswith(str(tmp_path))], by_rank1
    assert by_rank0.count(str(tmp_path / "two")) == 1  # OUT: a complete temporary directory renamed once
    for step in (2, 4):
        ckpt = str(tmp_path / "two-checkpoints" / f"checkpoint-{step}")
        written = {Path(p).name for p in by_rank0 if str(Path(p).parent) == ckpt}
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= written


@pytest.mark.slow
def test_fsdp_resume_ends_where_an_uninterrupted_fsdp_run_ends(tmp_path, inputs):
    base, data, _ = inputs
    first = torchrun(inputs, tmp_path, *train_args(base, data, tmp_path / "a", 2, "--fsdp", "--save-steps", 2))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = tmp_path / "a-checkpoints"
    (ckpts / "checkpoint-4").rename(tmp_path / "moved")  # as if the run had stopped after step 2
    second = torchrun(inputs, tmp_path, *train_args(base, data, tmp_path / "b", 2, "--fsdp", "--save-steps", 2,
                                                    "--checkpoint-dir", ckpts, "--resume", "--json"))
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout)
    assert report["resumed_from"].endswith("checkpoint-2") and report["steps"] == 4
    assert adapter_difference(tmp_path / "a", ckpts / "checkpoint-2") > 1e-3  # steps 3-4 moved the adapter
    a, b = load_adapter(tmp_path / "a").state_dict(), load_adapter(tmp_path / "b").state_dict()
    for key in a:  # the optimizer's moments came back into both shards: the same steps 3-4
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_accelerate_launch_with_an_fsdp_config_trains_with_fsdp(tmp_path, inputs):
    pytest.importorskip("yaml")
    base, data, audit = inputs
    config = tmp_path / "fsdp.yaml"  # what `accelerate config` writes for FSDP, on the CPU
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                      "num_processes: 2\nmixed_precision: 'no'\nuse_cpu: true\nfsdp_config:\n  fsdp_version: 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "bora_tools.cli",
         *train_args(base, data, tmp_path / "two", 2, "--save-steps", 4, "--json")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["processes"] == 2
    # The FSDP trainer's checkpoint: the optimizer state gathered by parameter name (DDP's is by index).
    state = torch.load(tmp_path / "two-checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
    assert state and all(isinstance(k, str) and k.endswith(("lora_A", "lora_B", "bora_sigma")) for k in state)
    one_process(*train_args(base, data, tmp_path / "one", 4))
    assert adapter_difference(tmp_path / "one", tmp_path / "two") < TOLERANCE


def test_fsdp_in_one_process_is_refused_in_one_line(tmp_path, inputs):
    base, data, _ = inputs
    result = run(*train_args(base, data, tmp_path / "out", 2, "--fsdp"))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        "Error: --fsdp shards the model over several processes; this is one (launch with torchrun "
        "--nproc_per_node N (or accelerate launch), or leave out --fsdp)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_gathered_state_of_empty_tensors_is_refused_and_nothing_written(tmp_path):
    """ZeRO-3's failure (accelerate #3508): tensors of size 0 handed to save_pretrained. Not a DeepSpeed run."""
    from bora_tools.core.config import BoraConfig
    from bora_tools.errors import ShapeError
    from bora_tools.training import add_bora
    from bora_tools.training.layers import adapter_keys

    model = add_bora(build_model("llama"), BoraConfig(r=4, bora_blocks=2, target_modules=["q_proj"]))
    with pytest.raises(ShapeError, match="expected 2-D lora_A"):
        model.save_pretrained(tmp_path / "ckpt", state_dict={k: torch.empty(0) for k in adapter_keys(model)})
    assert not (tmp_path / "ckpt").exists()
