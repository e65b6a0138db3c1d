"""The CLI frame, `inspect` and `demo`, driven as a user would."""

import json
import subprocess
import sys

import pytest
import torch
from cli_support import run


@pytest.fixture(scope="module")
def adapter_dir(tiny):
    return tiny.adapter("llama", r=4, bora_blocks=4, lora_alpha=8, rank_pattern={"o_proj": 2}).path


def test_inspect_json_counts_parameters_and_ranks(adapter_dir):
    result = run("inspect", adapter_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_modules"] == 14
    total = 0
    for m in report["modules"]:
        rows, cols = m["shape"]
        assert m["parameters"] == m["r"] * (rows + cols) + m["b"] ** 2 * m["r"]
        assert m["rank"] == m["max_rank"] == min(m["b"] * m["r"], rows, cols)
        total += m["parameters"]
    assert report["total_parameters"] == total
    o_proj = next(m for m in report["modules"] if m["name"].endswith("o_proj"))
    assert (o_proj["r"], o_proj["rank"], o_proj["scaling"]) == (2, 8, 4.0)


def test_inspect_table(adapter_dir):
    result = run("inspect", adapter_dir)
    assert result.exit_code == 0 and "model.layers.1.mlp.down_proj" in result.stdout and "16/16" in result.stdout


def test_inspect_rank_of_fresh_adapter_is_zero(tiny):
    fresh = tiny.adapter("llama", r=2, bora_blocks=2, target_modules=["q_proj"], randomize=None)
    result = run("inspect", fresh.path, "--json")
    assert all(m["rank"] == 0 for m in json.loads(result.stdout)["modules"])


def test_bad_input_gives_one_line_and_no_traceback(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{nope")
    result = run("inspect", tmp_path)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "adapter_config.json: not valid JSON" in lines[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{nope")
    proc = subprocess.run(
        [sys.executable, "-m", "bora_tools.cli", "--debug", "inspect", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_missing_path_is_a_usage_error(tmp_path):
    result = run("inspect", tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_cuda_refused_cleanly_without_gpu(adapter_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: --device cuda is valid here")
    result = run("inspect", adapter_dir, "--device", "cuda")
    assert result.exit_code == 1 and result.stderr.startswith("Error: --device cuda: no CUDA device")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bora_tools.cli", "demo", "--workdir", str(tmp_path / "d"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[train]" in proc.stdout and "[inspect]" in proc.stdout
    first, last = map(float, proc.stdout.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first - 0.5  # the loss falls visibly
    assert (tmp_path / "d" / "bora-adapter" / "adapter_model.safetensors").is_file()


def test_demo_refuses_non_empty_workdir(tmp_path):
    (tmp_path / "x").write_text("keep me")
    result = run("demo", "--workdir", tmp_path)
    assert result.exit_code == 1 and "is not empty" in result.stderr and (tmp_path / "x").read_text() == "keep me"


@pytest.mark.slow
def test_demo_json_prints_only_the_figures_on_stdout(tmp_path):
    result = run("demo", "--workdir", tmp_path / "d", "--steps", "5", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert list(figures)[:3] == ["train", "inspect", "merge"] and figures["train"]["steps"] == 5
    assert "[train]" in result.stderr
