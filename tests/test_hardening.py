"""Hardening (issue 15): no silent inf, no dropped update, no shape llama.cpp refuses, no token in any
output, every hostile input one clean line, signals handled, float64 kept, strict JSON.

Conventions of the bad-input suite (checked by ``cli_support.clean_failure``): one ``Error:`` line
naming the culprit, the exit code, no traceback, inputs untouched and nothing written (no temporary
left behind either).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_support import (
    COMMANDS,
    GGUF,
    READS_ADAPTER,
    ST,
    Q,
    clean_failure,
    config,
    edit_json,
    edit_tensors,
    first_shard,
    rewrite_header,
    run,
    tensors,
)
from safetensors.torch import load_file

from bora_tools.cli.frame import emit_json
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model
from bora_tools.errors import BoraError, ConfigError, raise_if_problems
from bora_tools.io.model_dir import INDEX_FILE
from bora_tools.training import add_bora, load_bora

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- 1. no silent inf --------------------------------------------------------------------------

QUIET = ["--quiet"]  # an overflow is found while the weights are written: no progress label before the line


def test_absurd_scale_refused_at_validation(work):
    clean_failure(work, COMMANDS["merge"](work) + ["--scale", "1e39"], "--scale", "1e+39")


@pytest.mark.parametrize("command", READS_ADAPTER)
def test_absurd_lora_alpha_refused_at_validation(work, command):
    edit_json(work["adapter"] / "adapter_config.json", lambda c: c.update(lora_alpha=1e45))
    clean_failure(work, command, "lora_alpha", "1e+45")


def test_absurd_alpha_pattern_refused(work):
    edit_json(work["adapter"] / "adapter_config.json", lambda c: c.update(alpha_pattern={"q_proj": 1e40}))
    clean_failure(work, "inspect", "alpha_pattern['q_proj']")


def _huge_factors(work):
    # Finite float32 factors whose product overflows float32: W + dW is inf unless checked where it is made.
    edit_tensors(work["adapter"] / ST, lambda t: (t[Q + ".lora_A.weight"].fill_(1e20),
                                                   t[Q + ".lora_B.weight"].fill_(1e20)))


@pytest.mark.parametrize("extra", [[], ["--dtype", "float32"], ["--dtype", "bfloat16"]])
def test_merge_overflow_in_float32_is_refused_naming_module_and_cause(work, extra):
    _huge_factors(work)
    line = clean_failure(work, COMMANDS["merge"](work) + extra + QUIET, "q_proj", "overflows float32", "scaling")
    assert "--scale" in line  # the hint names the flag


@pytest.mark.parametrize("outtype", ["f16", "q8_0", "f32"])
def test_gguf_merge_overflow_is_refused(work, outtype):
    _huge_factors(work)
    clean_failure(work, COMMANDS["gguf-merge"](work) + ["--outtype", outtype, *QUIET], "q_proj", "non-finite")


def test_to_lora_float16_overflow_hint_names_the_flag(work):
    _huge_factors(work)
    line = clean_failure(work, COMMANDS["to-lora"](work) + ["--dtype", "float16", *QUIET], "q_proj",
                         "overflows float16")
    assert "--dtype float32 or bfloat16" in line


def test_q8_0_block_scale_overflow_is_refused(work):
    path = first_shard(work["base"])
    edit_tensors(path, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), 1e8))
    line = clean_failure(work, COMMANDS["gguf-full"](work) + ["--outtype", "q8_0", *QUIET], "attn_q",
                         "Q8_0 block scale")
    assert "--outtype f32 or bf16" in line


def test_cast_refuses_values_computed_non_finite():
    from bora_tools.core.dtypes import cast_finite
    from bora_tools.errors import UnsupportedError

    t = torch.tensor([1.0, math.inf])
    assert cast_finite(t, torch.float16, "x")[1].isinf()  # a source's own inf is carried over
    with pytest.raises(UnsupportedError, match="x: 1 value"):
        cast_finite(t, torch.float16, "x", strict=True)


# -- 2. no dropped update ----------------------------------------------------------------------


@pytest.mark.parametrize("command", READS_ADAPTER)
def test_module_both_adapted_and_saved_is_refused(work, command):
    edit_json(work["adapter"] / "adapter_config.json",
              lambda c: c.update(modules_to_save=["model.layers.0.self_attn.q_proj"]))
    clean_failure(work, command, "model.layers.0.self_attn.q_proj", "modules_to_save")


def test_module_both_adapted_and_saved_with_its_tensor_is_refused(work):
    edit_json(work["adapter"] / "adapter_config.json", lambda c: c.update(modules_to_save=["q_proj"]))
    edit_tensors(work["adapter"] / ST, lambda t: t.update({Q + ".weight": torch.zeros(64, 64)}))
    clean_failure(work, "merge", "q_proj", "both adapted and listed in modules_to_save")


def test_training_layers_refuse_the_conflict(work):
    model = build_model("llama")
    cfg = BoraConfig(r=2, bora_blocks=2, target_modules=["q_proj"], modules_to_save=["q_proj"])
    with pytest.raises(ConfigError, match="model.layers.0.self_attn.q_proj is also matched by target_modules"):
        add_bora(model, cfg)
    edit_json(work["adapter"] / "adapter_config.json", lambda c: c.update(modules_to_save=["q_proj"]))
    with pytest.raises(BoraError, match="both adapted and listed in modules_to_save"):
        load_bora(build_model("llama"), work["adapter"])


# -- 3. export-gguf: config against tensors, before the first byte ------------------------------


GGUF_CONFIG_CASES = {
    "intermediate_size": ({"intermediate_size": 96}, "intermediate_size 96"),
    "head_dim": ({"head_dim": 8}, "head_dim 8"),
    "num_hidden_layers": ({"num_hidden_layers": 3}, "num_hidden_layers is 3"),
    "hidden_size": ({"hidden_size": 48, "head_dim": 16}, "hidden_size 48"),
}


@pytest.mark.parametrize("command", GGUF)
@pytest.mark.parametrize("case", list(GGUF_CONFIG_CASES))
def test_gguf_config_contradicting_tensors_is_refused(work, case, command):
    change, culprit = GGUF_CONFIG_CASES[case]
    edit_json(work["base"] / "config.json", lambda c: c.update(change))
    clean_failure(work, command, culprit)


# -- 4. tokens ---------------------------------------------------------------------------------

TOKEN = "hf_sEcReTtOkEn1234567890abcdefXYZ"


def test_clean_token_strips_and_refuses_without_showing_it():
    from bora_tools.errors import HubError
    from bora_tools.hub.push import clean_token

    assert clean_token(f"  {TOKEN}\r\n") == TOKEN
    for bad in (f"{TOKEN[:10]} {TOKEN[10:]}", f"{TOKEN}é", f"{TOKEN[:5]}\x00{TOKEN[5:]}", " \r\n"):
        with pytest.raises(HubError) as info:
            clean_token(bad)
        assert TOKEN[:12] not in info.value.one_line()


@pytest.fixture
def hub():
    sys.path.insert(0, str(Path(__file__).parent))
    from hub_server import FakeHub

    with FakeHub(tokens={TOKEN: "write"}) as server:
        yield server


def _push(hub, tmp_path, *args, token=TOKEN):
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home)}
    cmd = [sys.executable, "-m", "bora_tools.cli", "push", *map(str, args), "--token", token]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_pasted_token_with_crlf_pushes(hub, tmp_path, pristine):
    result = _push(hub, tmp_path, pristine["adapter"], "me/bora", token=TOKEN + "\r\n")
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("bad", [TOKEN[:8] + " " + TOKEN[8:], TOKEN + "ü", TOKEN[:8] + "\r" + TOKEN[8:]])
@pytest.mark.parametrize("debug", [[], ["--debug"]])
@pytest.mark.slow
def test_bad_token_is_one_line_and_never_printed(hub, tmp_path, pristine, bad, debug):
    result = _push(hub, tmp_path, pristine["adapter"], "me/bora", *debug, token=bad)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "token" in errors[0] and "control character or a non-ASCII" in errors[0]
    assert ("Traceback" in result.stderr) == bool(debug)
    for part in (TOKEN[:12], TOKEN[12:]):
        assert part not in result.stdout + result.stderr


def test_debug_traceback_scrubs_the_token_in_every_chained_cause(tmp_path, pristine, monkeypatch):
    from huggingface_hub import HfApi

    def echoing_server(self, *args, **kwargs):
        try:
            raise OSError(f"server echoed: Authorization: Bearer {TOKEN}")
        except OSError as inner:
            raise RuntimeError(f"request failed with headers {{'authorization': 'Bearer {TOKEN}'}}") from inner

    monkeypatch.setattr(HfApi, "create_repo", echoing_server)
    for debug in ([], ["--debug"]):
        result = run("push", pristine["adapter"], "me/x", "--token", TOKEN, *debug)
        assert result.exit_code == 3
        assert TOKEN not in result.output and "***" in result.output
        assert ("Traceback" in result.output) == bool(debug)
        if debug:
            assert "server echoed" in result.output and "request failed" in result.output  # both causes shown


# -- 5. error lines capped ---------------------------------------------------------------------


def test_error_lines_are_capped():
    with pytest.raises(ConfigError) as info:
        raise_if_problems("x", [f"problem {i} " + "k" * 2000 for i in range(5000)], cls=ConfigError)
    line = info.value.one_line()
    assert "5000 problems" in line and "and 4990 more" in line and len(line) < 6000


@pytest.mark.slow
def test_many_unexpected_keys_give_one_short_line(work):
    edit_tensors(work["adapter"] / ST, lambda t: t.update({f"junk.{i}" + "x" * 200: torch.zeros(1)
                                                           for i in range(3000)}))
    line = clean_failure(work, "inspect", "unexpected key", "more")
    assert len(line) < 10_000


# -- 6. hostile inputs: one clean line, exit 1 -----------------------------------------------------


def _deep(n=100_000):
    return "[" * n + "]" * n


_DEEP_OBJECT = '{"a": ' + _deep() + "}"


def _write(name, text):
    return lambda d: (d / name).write_text(text)


def _base_config(mutate):
    return config(mutate, "config.json")


BASE_CASES = {
    "deep-config": (_write("config.json", _DEEP_OBJECT), "config.json", ["merge", "gguf-full"]),
    "deep-index": (_write(INDEX_FILE, _deep()), INDEX_FILE, ["merge", "gguf-full"]),
    "deep-shard-header": (
        lambda b: rewrite_header(first_shard(b), lambda h: None,
                                 raw=lambda h: json.dumps(h)[:-1] + ', "x": ' + _deep(20_000) + "}"),
        "safetensors header", ["merge", "gguf-full"]),
    "deep-tokenizer": (_write("tokenizer.json", _DEEP_OBJECT), "tokenizer.json", ["gguf-full"]),
    "deep-tokenizer-config": (_write("tokenizer_config.json", _DEEP_OBJECT), "tokenizer_config.json", ["gguf-full"]),
    "tokenizer-not-object": (_write("tokenizer.json", "[1, 2]"), "tokenizer.json", ["gguf-full"]),
    "tokenizer-malformed": (config(lambda t: t.update(pre_tokenizer=[1], decoder=[2]), "tokenizer.json"),
                            "tokenizer", ["gguf-full"]),
    "tokenizer-config-malformed": (_write("tokenizer_config.json", '"just text"'), "tokenizer_config.json",
                                   ["gguf-full"]),
    "rope-theta-huge": (_base_config(lambda c: c.update(rope_parameters={"rope_theta": 1e308})), "rope_theta", GGUF),
    "rope-theta-huge-v4": (_base_config(lambda c: (c.pop("rope_parameters"), c.update(rope_theta=1e308))),
                           "rope_theta", GGUF),
    "context-huge": (_base_config(lambda c: c.update(max_position_embeddings=2**70)), "max_position_embeddings",
                     GGUF),
    "llama3-factor-string": (_base_config(lambda c: c.update(
        rope_parameters={"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})), "factor", GGUF),
    "llama3-low-string": (_base_config(lambda c: c.update(
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": "1"})), "low_freq_factor", GGUF),
    "vocab-size-huge": (_base_config(lambda c: c.update(vocab_size=2**40)), "vocab_size", GGUF),
    "vocab-size-big": (_base_config(lambda c: c.update(vocab_size=50_000_000)), "vocab_size", ["gguf-full"]),
    "lone-surrogate-name": (
        lambda b: rewrite_header(first_shard(b), lambda h: h.update({"x\ud800y": {"dtype": "F32", "shape": [0],
                                                                                  "data_offsets": [0, 0]}})),
        "not valid Unicode", ["merge", "gguf-full"]),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_hostile_base_is_one_clean_line(work, case):
    spoil, culprit, commands = BASE_CASES[case]
    spoil(work["base"])
    for command in commands:
        clean_failure(work, command, culprit)


ADAPTER_CASES = {
    "deep-config": (_write("adapter_config.json", _deep()), "adapter_config.json"),
    "float8": (tensors(lambda t: t.update({Q + ".lora_A.weight": t[Q + ".lora_A.weight"].to(torch.float8_e4m3fn)})),
               "float8_e4m3fn"),
    "in-features-0": (tensors(lambda t: t.update({Q + ".lora_A.weight": torch.zeros(4, 0)})), "empty factors"),
    "global-flag-in-key": (config(lambda c: c.update(rank_pattern={"(?i)q_proj": 4})), "(?i)q_proj"),
    "bad-regex-target": (config(lambda c: c.update(target_modules="(q_proj")), "(q_proj"),
    "long-pattern": (config(lambda c: c.update(rank_pattern={"a" * 5000: 4})), "5000 characters"),
}


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
@pytest.mark.parametrize("command", ["inspect", "merge", "gguf-lora"])
def test_hostile_adapter_is_one_clean_line(work, case, command):
    spoil, culprit = ADAPTER_CASES[case]
    spoil(work["adapter"])
    clean_failure(work, command, culprit)


def test_legacy_bin_in_the_pre_zip_format_is_refused(work):
    os.remove(work["adapter"] / ST)
    torch.save({"a": torch.zeros(2)}, work["adapter"] / "adapter_model.bin", _use_new_zipfile_serialization=False)
    clean_failure(work, "inspect", "adapter_model.bin", "not a zip-based")


def test_legacy_bin_in_the_zip_format_still_loads(work):
    weights = load_file(work["adapter"] / ST)
    os.remove(work["adapter"] / ST)
    torch.save(weights, work["adapter"] / "adapter_model.bin")
    result = run("inspect", work["adapter"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_modules"] == 14


def test_push_of_adapter_with_list_peft_type_is_one_line(pristine, tmp_path):
    adapter = shutil.copytree(pristine["adapter"], tmp_path / "a")
    edit_json(adapter / "adapter_config.json", lambda c: c.update(peft_type=["BORA"]))
    result = run("push", adapter, "me/x", "--token", TOKEN)
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1 and "peft_type" in result.stderr


def test_push_of_model_with_int_architectures_is_one_line(pristine, tmp_path):
    base = shutil.copytree(pristine["base"], tmp_path / "b")
    edit_json(base / "config.json", lambda c: c.update(architectures=7))
    result = run("push", base, "me/x", "--token", TOKEN)
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1 and "architectures" in result.stderr


@pytest.mark.parametrize("command", ["merge", "gguf-full"])
def test_a_valid_240_character_output_name_works(work, command):
    argv = COMMANDS[command](work)
    name = "m" * 235 + (".gguf" if command.startswith("gguf") else "")
    argv[argv.index("--out") + 1] = work["outdir"] / name
    result = run(*argv, "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work["outdir"].iterdir()) == [name]


def test_read_only_file_system_reports_the_real_error(work, monkeypatch):
    import errno
    import pathlib

    import bora_tools.io.atomic as atomic

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.os, "replace", erofs)
    monkeypatch.setattr(pathlib.Path, "unlink", erofs)  # the cleanup fails too, as it does on a read-only mount
    result = run(*COMMANDS["gguf-full"](work))
    assert result.exit_code == 1 and result.stderr.count("Error:") == 1, result.output
    assert "read-only file system" in result.stderr and "Traceback" not in result.output
    assert not (work["outdir"] / "base.gguf").exists()


def _fsize_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.skipif(sys.platform != "linux", reason="uses rlimits")
@pytest.mark.slow
def test_demo_on_a_full_disk_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bora_tools.cli", "demo", "--workdir", str(tmp_path / "d"),
                           "--steps", "1", "--quiet"], capture_output=True, text=True, preexec_fn=_fsize_limit,
                          timeout=300, cwd=REPO_ROOT)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: demo workdir") and "Traceback" not in proc.stderr


# -- 7. signals, float64, JSON ----------------------------------------------------------------------

# Runs the CLI with the final rename patched: `hold` prints READY and sleeps either before the real
# rename (the output is complete in its temporary) or after it (the output is at its target).
_HOLD = textwrap.dedent("""
    import os, sys, time
    import bora_tools.io.atomic as atomic
    where = sys.argv.pop(1)
    real_commit, real_replace = atomic._commit, os.replace
    def commit(tmp, target, **kw):
        if where == "before":
            print("READY", flush=True); time.sleep(60)
        real_commit(tmp, target, **kw)
        if where == "after":
            print("READY", flush=True); time.sleep(60)
    def replace(src, dst):
        if where == "during" and "-old-" in str(dst):  # signals are held here: this sleep is not interrupted
            print("READY", flush=True); time.sleep(2)
        real_replace(src, dst)
    atomic._commit = commit
    atomic.os.replace = replace
    from bora_tools.cli import main
    sys.argv[0] = "bora-tools"
    main()
""")


def _held(where, argv):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, where, *map(str, argv), "--quiet"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    return proc


def leftovers(directory):
    return [p.name for p in directory.iterdir() if ".bora-tmp-" in p.name]


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
@pytest.mark.parametrize("command", ["merge", "gguf-full"])
@pytest.mark.slow
def test_signal_before_the_rename_removes_the_temporary(work, sig, code, word, command):
    proc = _held("before", COMMANDS[command](work))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [f"Error: {word}; nothing was written"]
    assert not any(work["outdir"].iterdir())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_after_the_rename_says_the_output_is_complete(work, sig, code):
    proc = _held("after", COMMANDS["merge"](work))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "merged was written; it is complete" in lines[0] and "Traceback" not in err
    assert (work["outdir"] / "merged" / "config.json").is_file() and not leftovers(work["outdir"])


@pytest.mark.slow
def test_interrupt_during_an_overwrite_leaves_no_temporary(work):
    out = work["outdir"] / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old output")
    proc = _held("during", COMMANDS["merge"](work) + ["--overwrite"])
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "it is complete" in err and "Traceback" not in err, err
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert not leftovers(work["outdir"])


@pytest.mark.slow
def test_interrupt_during_shutdown_prints_no_traceback(work):
    script = textwrap.dedent("""
        import atexit, sys, time
        atexit.register(lambda: (print("READY", flush=True), time.sleep(3)))
        from bora_tools.cli import main
        sys.argv[0] = "bora-tools"
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, COMMANDS["inspect"](work)), "--quiet"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.stdout.readline().strip() != "READY":
        pass
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.fixture(scope="module")
def float64_case(tiny):
    adapter = tiny.adapter("llama", model_kwargs={"dtype": torch.float64}, r=4, bora_blocks=2,
                           target_modules=["q_proj"])
    return tiny.base("llama", dtype=torch.float64), adapter.path


def test_float64_base_stays_float64(float64_case, tmp_path):
    from bora_tools.core.adapter import load_adapter
    from bora_tools.core.factors import delta_weight

    base, adapter = float64_case
    name = "model.layers.0.self_attn.q_proj.weight"
    w = load_file(base / "model.safetensors")
    for scale in ("0", "1"):
        out = tmp_path / f"m{scale}"
        result = run("merge", adapter, "--base", base, "--out", out, "--quiet", "--scale", scale)
        assert result.exit_code == 0, result.output
        merged = load_file(out / "model.safetensors")
        assert all(t.dtype == torch.float64 for t in merged.values())
        mod = load_adapter(adapter).modules["model.layers.0.self_attn.q_proj"]
        want = w[name] + float(scale) * delta_weight(mod.A, mod.B, mod.sigma, mod.scaling, dtype=torch.float64)
        assert (merged[name] - want).abs().max() < 1e-12  # float32 rounding would leave ~1e-8
        if scale == "0":
            assert torch.equal(merged[name], w[name])


def test_json_is_strict_with_non_finite_numbers(capsys):
    emit_json({"a": math.inf, "b": [1.0, -math.inf, math.nan], "c": (2.5, math.nan), "d": {"e": Path("x")}})
    text = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"{name} in JSON output")

    data = json.loads(text, parse_constant=refuse)
    assert data == {"a": None, "b": [1.0, None, None], "c": [2.5, None], "d": {"e": "x"}}
