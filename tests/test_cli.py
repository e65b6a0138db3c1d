"""The CLI frame, `inspect` and `demo`, driven as a user would."""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
import torch
from cli_support import run
from click.testing import CliRunner

from bora_tools.cli import cli


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


# -- the package: entry points, registration, a light --help ------------------------------------


REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_command_of_the_command_modules_is_registered():
    from bora_tools.cli import adapters, demo, gguf, hub, train, verify

    defined = {obj.name: obj for module in (adapters, demo, gguf, hub, train, verify) for obj in vars(module).values()
               if isinstance(obj, click.Command)}
    assert defined == cli.commands


def test_the_console_script_is_the_apps_main():
    from bora_tools.cli.app import main

    module, attr = re.search(r'^bora-tools = "([\w.]+):(\w+)"$', (REPO_ROOT / "pyproject.toml").read_text(),
                             re.M).groups()
    assert getattr(importlib.import_module(module), attr) is main


def test_help_loads_neither_torch_nor_transformers():
    # Every --help in one fresh interpreter; after each, the heavy libraries it loaded (none may be).
    helps = [["--help"]] + [[name, "--help"] for name in sorted(cli.commands)]
    code = "\n".join([
        "import contextlib, io, sys",
        "from bora_tools.cli import cli",
        f"for args in {helps!r}:",
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):",
        "        cli(args, prog_name='bora-tools')",
        "    print(' '.join(args), sorted(m for m in ('torch', 'transformers') if m in sys.modules))",
    ])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(helps) and all(line.endswith(" []") for line in lines), proc.stdout


def test_train_options_are_made_from_the_train_options_fields():
    from bora_tools.cli.params import _DtypeType
    from bora_tools.training.options import TrainOptions

    params = {p.name: p for p in cli.commands["train"].params}
    fields = dataclasses.fields(TrainOptions)
    for f in fields:
        flag, param = f.metadata["flag"], params[f.name]
        assert (param.opts + param.secondary_opts, param.default, param.help) == (list(flag.names), f.default,
                                                                                   flag.help), f.name
    # Every other option of train is a path, the config file, the push at the end or a flag every command shares:
    # no hyperparameter bypasses the fields.
    others = [name for name in params if name not in {f.name for f in fields}]
    assert others == ["config", "base", "data", "out", "push_to_hub", "device", "token", "overwrite", "as_json",
                      "debug", "quiet"]
    assert isinstance(params["dtype"].type, _DtypeType) and params["rslora"].is_flag
    assert list(params["scheduler"].type.choices) == ["linear", "cosine", "constant"]
    assert (params["max_steps"].type, params["alpha"].type) == (click.INT, click.FLOAT)


@pytest.mark.parametrize("given,expected", [
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("q_proj", ["q_proj"]),
    ("model.layers.0.mlp.up_proj", ["model.layers.0.mlp.up_proj"]),
    (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
])
def test_target_modules_are_names_or_one_regex(given, expected):
    param = next(p for p in cli.commands["train"].params if p.name == "target_modules")
    assert param.type.convert(given, param, None) == expected


def test_one_field_makes_an_option_with_its_aliases_and_an_unknown_type_needs_a_kind():
    from bora_tools.cli.train import _click_option
    from bora_tools.training.options import FRACTION, option

    @dataclasses.dataclass(frozen=True)
    class More:
        warmup_ratio: float | None = option(None, "--warmup-ratio", "--warmup_ratio", check=FRACTION,
                                            help="Warmup as a fraction of the steps.")
        sizes: tuple[int, ...] = option((), "--sizes", help="Sizes.")

    hints = typing.get_type_hints(More)
    ratio, sizes = dataclasses.fields(More)

    @click.command()
    @_click_option(ratio, hints["warmup_ratio"])
    def command(warmup_ratio):
        click.echo(repr(warmup_ratio))

    assert CliRunner().invoke(command, ["--warmup_ratio", "0.25"]).output == "0.25\n"
    assert "--warmup-ratio, --warmup_ratio FLOAT" in CliRunner().invoke(command, ["--help"]).output
    with pytest.raises(TypeError, match="sizes: .* has no click type"):
        _click_option(sizes, hints["sizes"])
