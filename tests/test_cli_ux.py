"""The command line as users of hf, PEFT and mergekit expect it: honest push reports, input kinds named,
defaults and dtype spellings, output folders, readable reports, the demo's commands, consistent usage errors.

Each test drives the CLI (CliRunner, or a subprocess where huggingface_hub's environment or a signal
matters) and checks the behaviour on disk or in the report's JSON, not the exact prose.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
import torch
from cli_support import run
from hub_server import FakeHub
from safetensors import safe_open

from bora_tools.cli import cli
from bora_tools.core.adapter import load_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, default_targets, save_model_dir
from bora_tools.hub.push import push
from bora_tools.io.atomic import atomic_output
from bora_tools.training import add_bora, randomize_bora, save_bora

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[1]
WRITE = "hf_wRiTeToKeN1234567890abcdef"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    model = build_model("llama")
    base = save_model_dir(model, root / "tiny-base")
    add_bora(model, BoraConfig(r=2, bora_blocks=2, lora_alpha=4, target_modules=default_targets("llama")))
    randomize_bora(model, seed=3)
    adapter = save_bora(model, root / "my-bora")
    return {"base": base, "adapter": adapter, "root": root}


def one_error(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    return errors[0]


# ----- 2. push tells the truth ------------------------------------------------------------------
def test_push_reports_what_the_commit_carried_and_nothing_when_unchanged(dirs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what HF_HUB_DISABLE_XET=1 sets at import
    src = tmp_path / "adapter"
    src.mkdir()
    for p in dirs["adapter"].iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    with FakeHub(tokens={WRITE: "write"}) as hub:
        first = push(path=src, repo_id="me/bora", token=WRITE, endpoint=hub.endpoint)
        assert first.commit is not None and first.commit["oid"] == hub.head("me/bora")
        assert first.files == ["README.md", "adapter_config.json", "adapter_model.safetensors"] and first.card_written
        commits = len(hub.calls("commit"))
        again = push(path=src, repo_id="me/bora", token=WRITE, endpoint=hub.endpoint)
        assert len(hub.calls("commit")) == commits and hub.head("me/bora") == first.commit["oid"]
        data = again.to_dict()
        assert data["commit"] is None and data["files"] == [] and data["card_written"] is False
        assert again.to_text().startswith("nothing to upload: me/bora@main is already up to date")
        config = json.loads((src / "adapter_config.json").read_text())
        (src / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 8}))
        changed = push(path=src, repo_id="me/bora", token=WRITE, endpoint=hub.endpoint)
        # the card describes lora_alpha, so it changes with the config; the weights did not
        assert changed.files == ["README.md", "adapter_config.json"] and changed.commit["oid"] == hub.head("me/bora")
        assert changed.unchanged == ["adapter_model.safetensors"]
        assert "adapter_config.json" in changed.to_text() and changed.commit["url"] in changed.to_text()


@pytest.mark.slow
def test_push_output_has_no_huggingface_hub_bars_or_messages(dirs, tmp_path):
    with FakeHub(tokens={WRITE: "write"}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "home"),
                "PYTHONPATH": str(REPO_ROOT)}
        cmd = [sys.executable, "-m", "bora_tools.cli", "push", str(dirs["adapter"]), "me/x", "--token", WRITE]
        outs = []
        for extra in ([], ["--json"]):
            err_file = tmp_path / f"stderr{len(outs)}.txt"
            with open(err_file, "w") as err:
                proc = subprocess.run(cmd + extra, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                      timeout=300)
            assert proc.returncode == 0, err_file.read_text()
            outs.append((proc.stdout, err_file.read_text()))
    (out1, err1), (out2, err2) = outs
    for err in (err1, err2):
        assert "\x1b[" not in err and "it/s" not in err and "Upload " not in err and "empty commit" not in err, err
        assert "No files have been modified" not in err, err
    assert "Pushed 3 file(s)" in out1 and "uploading to me/x" in err1  # our label, not huggingface_hub's bars
    second = json.loads(out2)
    assert second["commit"] is None and second["files"] == []


# ----- 3. input kinds ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrong_inputs(dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    lora = root / "peft-lora"
    assert run("to-lora", dirs["adapter"], "--out", lora, "--quiet").exit_code == 0
    ia3 = root / "peft-ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    empty = root / "empty"
    empty.mkdir()
    model_gguf = root / "tiny.gguf"
    assert run("export-gguf", dirs["base"], "--out", model_gguf, "--quiet").exit_code == 0
    return {"lora": lora, "ia3": ia3, "empty": empty, "gguf": model_gguf, "model": dirs["base"]}


@pytest.mark.parametrize("kind,words", [
    ("model", ["model directory", "--base"]),
    ("lora", ["PEFT LoRA adapter", "peft_type LORA", "not BoRA"]),
    ("ia3", ["peft_type IA3", "not BoRA"]),
    ("gguf", ["GGUF file"]),
    ("empty", ["empty folder"]),
])
def test_wrong_kind_of_adapter_is_named(wrong_inputs, dirs, tmp_path, kind, words):
    merge = ["merge", wrong_inputs[kind], "--base", dirs["base"], "--out", tmp_path / "m"]
    # merge reads a plain PEFT LoRA as BoRA with b = 1 (issue 19; tests/test_merge_many.py)
    for args in (["inspect", wrong_inputs[kind]], *([merge] if kind != "lora" else []),
                 ["to-lora", wrong_inputs[kind], "--out", tmp_path / "l"]):
        line = one_error(run(*args))
        assert all(w in line for w in words), line
    assert not (tmp_path / "m").exists() and not (tmp_path / "l").exists()


@pytest.mark.parametrize("kind,words", [
    ("lora", ["PEFT LoRA adapter", "not a model directory"]),
    ("gguf", ["GGUF file", "model directories"]),
    ("empty", ["empty folder", "model directory"]),
])
def test_wrong_kind_of_base_is_named(wrong_inputs, dirs, tmp_path, kind, words):
    line = one_error(run("merge", dirs["adapter"], "--base", wrong_inputs[kind], "--out", tmp_path / "m"))
    assert all(w in line for w in words), line
    line = one_error(run("merge", dirs["adapter"], "--base", dirs["adapter"], "--out", tmp_path / "m"))
    assert "BoRA adapter" in line and "not a model directory" in line


# ----- 4. defaults and dtype spellings ----------------------------------------------------------
def test_to_lora_defaults_to_the_exact_form(dirs, tmp_path):
    result = run("to-lora", dirs["adapter"], "--out", tmp_path / "lora", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["policy"]["rank"] == "full" and report["peft"]["r"] == 4  # b*r
    assert report["totals"]["max_rel_error"] < 1e-6


@pytest.mark.parametrize("spelling,dtype", [("fp16", torch.float16), ("F16", torch.float16), ("half", torch.float16),
                                            ("BF16", torch.bfloat16), ("Float32", torch.float32)])
def test_dtype_spellings(dirs, tmp_path, spelling, dtype):
    result = run("to-lora", dirs["adapter"], "--out", tmp_path / "lora", "--dtype", spelling, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == str(dtype).replace("torch.", "")
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}


def test_merge_dtype_alias_and_outtype_case(dirs, tmp_path):
    result = run("merge", dirs["adapter"], "--base", dirs["base"], "--out", tmp_path / "m", "--dtype", "bf16", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["dtype"] == "bfloat16"
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    for spelling, want in (("Q8_0", "q8_0"), ("FP32", "f32"), ("float16", "f16")):
        out = tmp_path / f"{spelling}.gguf"
        result = run("export-gguf", dirs["base"], "--out", out, "--outtype", spelling, "--json", "--quiet")
        assert result.exit_code == 0 and json.loads(result.stdout)["outtype"] == want, result.output
    assert run("merge", dirs["adapter"], "--base", dirs["base"], "--out", tmp_path / "x", "--dtype", "int8"
               ).exit_code == 2


# ----- 5. outputs -------------------------------------------------------------------------------
def test_missing_parent_folders_are_created(dirs, tmp_path):
    out = tmp_path / "a" / "b" / "merged"
    assert run("merge", dirs["adapter"], "--base", dirs["base"], "--out", out, "--quiet").exit_code == 0
    assert (out / "config.json").is_file()
    report = tmp_path / "r" / "s" / "report.json"
    assert run("to-lora", dirs["adapter"], "--out", tmp_path / "c" / "lora", "--report", report).exit_code == 0
    assert json.loads(report.read_text())["report_path"] == str(report)


def test_created_parents_are_removed_when_the_command_fails(dirs, tmp_path):
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "x" / "y" / "out.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "keep").mkdir()
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "keep" / "new" / "out", directory=True):
        raise RuntimeError("again")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"] and not any((tmp_path / "keep").iterdir())
    # a command refused before writing creates nothing
    result = run("merge", dirs["adapter"], "--base", dirs["adapter"], "--out", tmp_path / "n" / "m")
    assert result.exit_code == 1 and not (tmp_path / "n").exists()


def test_export_gguf_into_a_folder_and_suffix_warning(dirs, tmp_path):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    result = run("export-gguf", dirs["base"], "--out", folder, "--outtype", "q8_0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out"] == str(folder / "tiny-base-q8_0.gguf")
    assert (folder / "tiny-base-q8_0.gguf").read_bytes()[:4] == b"GGUF"
    result = run("export-gguf", dirs["adapter"], "--base", dirs["base"], "--out", f"{tmp_path}/new/", "--quiet")
    assert result.exit_code == 0 and (tmp_path / "new" / "my-bora-lora-f16.gguf").is_file()
    result = run("export-gguf", dirs["base"], "--out", tmp_path / "t5")
    assert result.exit_code == 0 and (tmp_path / "t5").is_file()
    assert any(line.startswith("Warning:") and ".gguf" in line for line in result.stderr.splitlines())


# ----- 6. reports -------------------------------------------------------------------------------
def test_merge_report_is_readable(dirs, tmp_path):
    result = run("merge", dirs["adapter"], "--base", dirs["base"], "--out", tmp_path / "m")
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith(f"wrote {tmp_path / 'm'}")
    text = result.stdout
    assert "1 * dW" not in text and "0 replaced" not in text and "0.0 MiB" not in text and "0.0 s" not in text
    assert re.search(r"\d+(\.\d)? (B|KiB|MiB)", lines[-1]) and re.search(r"\d+ ms|\d+\.\d s", lines[-1])
    assert all(line.strip() for line in lines)


def test_export_summary_comes_after_the_module_rows(dirs, tmp_path):
    result = run("export-gguf", dirs["adapter"], "--base", dirs["base"], "--out", tmp_path / "l.gguf")
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith(f"wrote {tmp_path / 'l.gguf'}") and "KiB" in lines[-1]
    assert any("rel. error" in line for line in lines[:-1])
    assert "largest relative error" not in result.stdout  # the full-rank export is exact: no "worst" module


@pytest.mark.slow
def test_to_lora_report_names_every_file_and_explains_its_columns(dirs, tmp_path, monkeypatch):
    import bora_tools.plot as plot

    seen = {}
    real = plot._draw_module

    def spy(ax_s, ax_e, mod, color):
        seen.setdefault("colors", []).append(color)
        return real(ax_s, ax_e, mod, color)

    monkeypatch.setattr(plot, "_draw_module", spy)
    real_plot = plot.plot_spectra
    monkeypatch.setattr(plot, "plot_spectra", lambda *a, **k: (seen.update(title=k["title"]), real_plot(*a, **k)))
    png, rep = tmp_path / "spectra.png", tmp_path / "report.json"
    result = run("to-lora", dirs["adapter"], "--out", tmp_path / "lora", "--rank", "2", "--plot", png, "--report", rep)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert str(png) in result.stdout and str(rep) in result.stdout and lines[-1].startswith(f"wrote {tmp_path}")
    assert "energy:" in result.stdout and "rel.error:" in result.stdout  # the column names, explained once
    assert "triplets" not in result.stdout + result.stderr
    assert "my-bora" in seen["title"]
    luminance = [0.2126 * r + 0.7152 * g + 0.0722 * b for r, g, b, _ in seen["colors"]]
    assert max(luminance) < 0.65  # no pale yellow on white
    exact = run("to-lora", dirs["adapter"], "--out", tmp_path / "lora-full")
    assert "worst" not in exact.stdout and "exact" in exact.stdout


def test_inspect_summary_is_last(dirs):
    result = run("inspect", dirs["adapter"])
    lines = result.stdout.strip().splitlines()
    table = [i for i, line in enumerate(lines) if "q_proj" in line]
    summary = [i for i, line in enumerate(lines) if line.startswith("BoRA adapter")]
    assert table and summary and max(table) < summary[0] and all(line.strip() for line in lines)


# ----- 7. demo ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_prints_runnable_commands(tmp_path):
    workdir = tmp_path / "w"
    result = run("demo", "--workdir", workdir, "--steps", "2")
    assert result.exit_code == 0, result.output
    commands = [line.split("$ ", 1)[1] for line in result.stdout.splitlines() if "$ bora-tools " in line]
    names = {shlex.split(c)[1] for c in commands}
    assert {"inspect", "merge", "to-lora", "export-gguf", "push"} <= names
    for command in commands:
        if " push " not in command:
            assert run(*shlex.split(command)[1:], "--quiet").exit_code == 0, command
    for path in re.findall(r"\S*w/[\w./-]+", "\n".join(commands)):
        assert Path(path).exists(), path


def test_demo_shows_no_deleted_paths():
    from bora_tools.demo.run import DemoContext, DemoReport

    ctx = DemoContext(workdir=Path("/tmp/bora-demo-xyz"))
    assert ctx.shown(Path("/tmp/bora-demo-xyz/merged")) == "WORKDIR/merged"
    assert "--workdir" in DemoReport(results={}, seconds=1.0).to_text()


@pytest.mark.slow
def test_demo_ctrl_c_removes_what_it_wrote(tmp_path):
    workdir = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bora_tools.cli", "demo", "--workdir", str(workdir),
                             "--steps", "2000", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (workdir / "base" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (workdir / "base").exists()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not workdir.exists(), err
    assert run("demo", "--workdir", workdir, "--steps", "1", "--quiet").exit_code == 0  # a rerun works


# ----- 8. consistency ---------------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["export-gguf", "{base}", "--rank", "4", "--out", "{out}.gguf"],
    ["export-gguf", "{adapter}", "--base", "{base}", "--merge", "--rank", "4", "--out", "{out}.gguf"],
    ["to-lora", "{adapter}", "--rank", "full", "--energy", "0.5", "--out", "{out}"],
    ["inspect", "no/such/path/here"],
])
def test_usage_conflicts_exit_2_with_the_usage_line(dirs, tmp_path, args):
    argv = [a.format(base=dirs["base"], adapter=dirs["adapter"], out=tmp_path / "o") for a in args]
    result = run(*argv)
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_help_version_completion():
    top = run("--help").stdout
    for name, command in cli.commands.items():
        assert command.short_help and not command.short_help.endswith("..."), name
        listed = next(line for line in top.splitlines() if line.strip().startswith(name + " "))
        assert not listed.rstrip().endswith("..."), listed
    assert "_BORA_TOOLS_COMPLETE=bash_source" in top
    version = run("--version").stdout
    for name in ("bora-tools", "Python", "torch", "transformers", "peft", "gguf", "huggingface_hub",
                 "llama-cpp-python"):
        assert re.search(rf"^{re.escape(name)}: \S", version, re.M), (name, version)
    env = {**os.environ, "_BORA_TOOLS_COMPLETE": "bash_complete", "COMP_WORDS": "bora-tools to-lora x --dtype b",
           "COMP_CWORD": "4", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", "from bora_tools.cli import main; main()"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "bfloat16" in proc.stdout and "bf16" in proc.stdout, proc.stdout + proc.stderr


def test_short_reprs(dirs):
    adapter = load_adapter(dirs["adapter"])
    text = repr(adapter)
    assert len(text) < 300 and "my-bora" in text and "tensor(" not in text
    module = next(iter(adapter.modules.values()))
    assert len(repr(module)) < 200 and "tensor(" not in repr(module)


def test_gguf_reader_sees_the_hub_free_name(dirs, tmp_path):
    out = tmp_path / "x.gguf"
    assert run("export-gguf", dirs["base"], "--out", out, "--quiet").exit_code == 0
    reader = gguf.GGUFReader(out)
    assert reader.get_field(gguf.Keys.General.NAME).contents() == "tiny-base"
