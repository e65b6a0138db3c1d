"""export-gguf --outtype q4_k_m & co.: llama.cpp's own quantizer (llama-cpp-python) on our intermediate GGUF.

Tiny Llama (float32) and Qwen2 (bfloat16) models whose rows are multiples of 256, so that llama.cpp's
k-quants (256-element super-blocks) apply without fallbacks and the files hold the real recipe's types.
Every file is loaded and run by llama.cpp; its logits are compared with the float32 GGUF's.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from cli_support import run

from bora_tools.demo.tiny import build_model, save_model_dir
from bora_tools.errors import UnsupportedError, ValidationError
from bora_tools.gguf.export import export_gguf
from bora_tools.gguf.outtypes import IMATRIX_OUTTYPES, OUTTYPES, QUANTIZER_OUTTYPES
from tests.gguf_support import IDS, QUANT_SHAPE, correlation, gguf_logits, llama_with_adapter, needs_llama_cpp

pytestmark = needs_llama_cpp

SHAPE = QUANT_SHAPE  # every row a multiple of 256

#: Correlation of llama.cpp's logits with the float32 GGUF's on these random-weight models, measured (llama /
#: qwen2: q2_k 0.696 / 0.783, q3_k_s 0.844 / 0.892, q3_k_m 0.900 / 0.944, q3_k_l 0.912 / 0.950, q4_0 0.949 / 0.958,
#: q4_1 0.956 / 0.967, q4_k_s 0.966 / 0.977, q4_k_m 0.962 / 0.972, q5_0 0.987 / 0.989, q5_1 0.989 / 0.990,
#: q5_k_s 0.989 / 0.992, q5_k_m 0.990 / 0.993, q6_k 0.997 / 0.997), pinned at 1 - 1.5 x (1 - the lower one).
MIN_CORR = {
    "q2_k": 0.54, "q3_k_s": 0.76, "q3_k_m": 0.84, "q3_k_l": 0.86, "q4_0": 0.92, "q4_1": 0.93, "q4_k_s": 0.94,
    "q4_k_m": 0.94, "q5_0": 0.98, "q5_1": 0.98, "q5_k_s": 0.98, "q5_k_m": 0.98, "q6_k": 0.995,
}
#: Every type on Llama; a spread of them on Qwen2 (bfloat16, tied embeddings, q/k/v biases).
CASES = [("llama", t) for t in QUANTIZER_OUTTYPES] + [("qwen2", t) for t in ("q2_k", "q4_0", "q4_k_m", "q6_k")]

#: The main tensor type of each file type (llama.cpp's ``llama_model_ftype`` default type).
BASE_TYPE = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q2_k": "Q2_K", "q3_k_s": "Q3_K",
    "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K", "q5_k_s": "Q5_K", "q5_k_m": "Q5_K",
    "q6_k": "Q6_K",
}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.bora-tmp-"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A float32 Llama with a BoRA adapter, and a bfloat16 Qwen2 (tied embeddings); their float32 GGUFs."""
    import torch

    root = tmp_path_factory.mktemp("quant")
    base, adapter = llama_with_adapter(root)
    qwen = save_model_dir(build_model("qwen2", dtype=torch.bfloat16, **SHAPE), root / "qwen2")
    paths = {"llama": base, "qwen2": qwen, "adapter": adapter, "root": root}
    for name in ("llama", "qwen2"):
        export_gguf(paths[name], root / f"{name}-f32.gguf", outtype="f32")
        paths[f"{name}-f32"] = root / f"{name}-f32.gguf"
    export_gguf(adapter, root / "merged-f32.gguf", base=base, merge=True, outtype="f32")
    paths["merged-f32"] = root / "merged-f32.gguf"
    return paths


@pytest.fixture(scope="module")
def reference(models):
    return {k: gguf_logits(models[f"{k}-f32"], IDS) for k in ("llama", "qwen2", "merged")}


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def file_type(path: Path) -> int:
    field = gguf.GGUFReader(path).fields[gguf.Keys.General.FILE_TYPE]
    return int(field.parts[field.data[0]][0])


@pytest.mark.parametrize(("arch", "outtype"), CASES)
def test_each_quantization_loads_in_llama_cpp_with_its_recipe_and_close_logits(models, reference, tmp_path, arch,
                                                                                outtype):
    out = tmp_path / "q.gguf"
    ticks = []

    def progress(items, *, total=None, label=""):
        for item in items:
            ticks.append(label)
            yield item

    report = export_gguf(models[arch], out, outtype=outtype, threads=2, progress=progress)
    types = tensor_types(out)
    # the file says what it is, and the report tells what is in it
    assert file_type(out) == gguf.LlamaFileType[OUTTYPES[outtype].file_type]
    assert report.types == dict(Counter(types.values())) and report.tensors == len(types)
    assert report.bytes == out.stat().st_size and not leftovers(tmp_path, "q.gguf")
    # the intermediate held the values exactly: float32 stays float32, bfloat16 stays bfloat16
    assert set(report.intermediate["types"]) == ({"F32"} if arch == "llama" else {"F32", "BF16"})
    assert report.peak_disk_bytes == report.intermediate["bytes"] + report.bytes
    data_bits = 8 * sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors)
    assert report.bits_per_weight == pytest.approx(data_bits / sum(int(t.n_elements) for t in
                                                                   gguf.GGUFReader(out).tensors), abs=1e-3)
    # llama.cpp's per-tensor lines drove the bar: one tick per tensor
    assert ticks.count(f"quantizing to {outtype} (llama.cpp)") == len(types)
    # llama.cpp's recipe: norms stay F32, the output matrix (or the tied embedding) gets more bits, the rest
    # is the file type's own type
    weights = {n: t for n, t in types.items() if not n.endswith(("_norm.weight", ".bias"))}
    assert all(t == "F32" for n, t in types.items() if n.endswith("_norm.weight"))
    assert Counter(weights.values()).most_common(1)[0][0] == BASE_TYPE[outtype]
    # llama.cpp gives more bits to the output matrix, or to the embedding when it is tied (qwen2 here)
    assert types["output.weight" if arch == "llama" else "token_embd.weight"] == "Q6_K"
    if outtype in ("q4_k_m", "q5_k_m"):  # use_more_bits: of 2 layers, the last one's attn_v and ffn_down
        assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
        assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == BASE_TYPE[outtype]
    corr = correlation(gguf_logits(out, IDS), reference[arch])
    print(f"{arch} {outtype}: correlation {corr:.5f}, {report.bits_per_weight} bpw, {report.types}")
    assert corr >= MIN_CORR[outtype]


@pytest.mark.parametrize("outtype", ["q4_k_m", "q4_0"])
def test_the_adapter_survives_quantization(models, reference, tmp_path, outtype):
    out = tmp_path / "merged.gguf"
    report = export_gguf(models["adapter"], out, base=models["llama"], merge=True, outtype=outtype, threads=2)
    assert report.kind == "merged" and report.merged_tensors == 14
    assert report.intermediate["types"] == {"F32": report.tensors}  # W + dW in float32, rounded once, by llama.cpp
    got = gguf_logits(out, IDS)
    to_merged = np.linalg.norm(got - reference["merged"])
    to_base = np.linalg.norm(got - reference["llama"])
    base_vs_merged = np.linalg.norm(reference["llama"] - reference["merged"])
    print(f"{outtype}: |q - merged| {to_merged:.3f}, |q - base| {to_base:.3f}, |base - merged| {base_vs_merged:.3f}")
    assert to_merged < 0.65 * to_base  # measured: 0.42 (q4_k_m), 0.51 (q4_0)


def test_rows_not_multiple_of_256_fall_back_as_llama_cpp_decides(tmp_path):
    from bora_tools.demo.tiny import build_model_dir

    small = build_model_dir(tmp_path / "small", "llama")  # hidden 64, intermediate 128
    report = export_gguf(small, tmp_path / "q.gguf", outtype="q4_k_m")
    types = tensor_types(tmp_path / "q.gguf")
    assert report.types == {"F32": 5, "Q5_0": 13, "Q8_0": 3}  # llama.cpp's fallbacks for Q4_K and Q6_K
    assert len(report.fallbacks) == 15 and all(types[f["tensor"]] == f["type"] for f in report.fallbacks)
    assert {"tensor": "blk.0.ffn_down.weight", "type": "Q5_0",
            "reason": "row of 128 is not a multiple of 256 (Q4_K)"} in report.fallbacks
    assert report.warnings == ["15 tensor(s) written by llama.cpp in a fallback type instead of q4_k_m's: their rows "
                               "are not a multiple of the type's block (token_embd.weight, blk.0.attn_k.weight, "
                               "blk.0.attn_output.weight, blk.0.attn_q.weight and 11 more)"]


def test_report_fields_in_json_and_text(models, tmp_path):
    out = tmp_path / "q.gguf"
    report = export_gguf(models["llama"], out, outtype="q6_k", threads=1)
    d = report.to_dict()
    assert d["threads"] == 1 and set(d["phases"]) == {"write_intermediate", "quantize"}
    assert json.loads(json.dumps(d))["peak_disk_bytes"] > d["bytes"]
    text = str(report)
    assert "bits per weight" in text and "peak disk" in text and "Q6_K" in text
    plain = export_gguf(models["llama"], tmp_path / "f16.gguf", outtype="f16").to_dict()
    assert not {"bits_per_weight", "intermediate", "peak_disk_bytes", "phases", "threads"} & set(plain)


def test_lora_adapters_refuse_llama_cpp_quantizations(models, tmp_path):
    out = tmp_path / "lora.gguf"
    with pytest.raises(ValidationError, match=r"`outtype` q4_k_m: a GGUF LoRA adapter is written as f32, f16, "
                                              r"bf16, q8_0; llama.cpp adds"):
        export_gguf(models["adapter"], out, base=models["llama"], outtype="q4_k_m")
    assert not out.exists() and not leftovers(tmp_path, "lora.gguf")


@pytest.mark.parametrize("outtype", ["iq4_xs", "q2_k_s"])
def test_types_that_need_an_importance_matrix_are_refused(models, tmp_path, outtype):
    assert outtype in IMATRIX_OUTTYPES
    with pytest.raises(UnsupportedError, match=f"`outtype` {outtype} needs an importance matrix"):
        export_gguf(models["llama"], tmp_path / "q.gguf", outtype=outtype)
    assert not list(tmp_path.iterdir())


def test_threads_must_be_positive(models, tmp_path):
    with pytest.raises(ValidationError, match="`threads` 0: expected a positive integer"):
        export_gguf(models["llama"], tmp_path / "q.gguf", outtype="q4_0", threads=0)


def test_push_card_names_the_quantization(models, tmp_path):
    from bora_tools.hub.card import build_model_card

    export_gguf(models["llama"], tmp_path / "model-Q4_K_M.gguf", outtype="q4_k_m")
    card = str(build_model_card(tmp_path, repo_id="me/tiny-gguf"))
    assert "Quantization: **Q4_K_M** (`model-Q4_K_M.gguf`)" in card


# ---- the command line: one line on errors, nothing left behind ----------------------------------------------

def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_quantizes_and_keeps_llama_cpp_logs_off_the_terminal(models, tmp_path, capfd):
    out = tmp_path / "q.gguf"
    result = run("export-gguf", models["llama"], "--out", out, "--outtype", "q4_k_m", "--threads", 2, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["types"]["Q6_K"] == 3
    # what reached the terminal: our progress labels, no llama.cpp log line (neither through Python nor on fd 2)
    assert "llama_model" not in result.stderr + capfd.readouterr().err
    assert "[   1/  21]" not in result.stderr
    debug = run("export-gguf", models["llama"], "--out", out, "--outtype", "q4_0", "--overwrite", "--quiet",
                "--debug")
    assert debug.exit_code == 0, debug.output
    assert "Debug: llama.cpp: [   1/  21] output.weight" in debug.stderr


@pytest.mark.parametrize("merge", [False, True])
def test_missing_llama_cpp_python_is_one_line_and_nothing_written(models, tmp_path, monkeypatch, merge):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError, as when not installed
    out = tmp_path / "q.gguf"
    source = ["export-gguf", models["adapter"], "--base", models["llama"], "--merge"] if merge else \
        ["export-gguf", models["llama"]]
    line = one_error_line(run(*source, "--out", out, "--outtype", "q4_k_m"))
    assert line == ("Error: --outtype q4_k_m is made by llama.cpp's quantizer from llama-cpp-python, which is not "
                    "installed (pip install 'bora-tools[llama]')")
    assert not list(tmp_path.iterdir())
    # our own types do not need it
    done = run(*source, "--out", out, "--outtype", "q8_0", "--quiet")
    assert done.exit_code == 0, done.output


def test_cli_refusals_are_one_line(models, tmp_path):
    out = tmp_path / "q.gguf"
    line = one_error_line(run("export-gguf", models["adapter"], "--base", models["llama"], "--out", out,
                              "--outtype", "q5_k_m"))
    assert "a GGUF LoRA adapter is written as f32, f16, bf16, q8_0" in line and "--merge" in line
    line = one_error_line(run("export-gguf", models["llama"], "--out", out, "--outtype", "iq2_xs"))
    assert "--outtype iq2_xs needs an importance matrix" in line
    assert run("export-gguf", models["llama"], "--out", out, "--threads", 0).exit_code == 2
    assert not list(tmp_path.iterdir())


# llama.cpp's quantizer is paused at its third tensor (the final temporary half-written, the intermediate
# complete); the test kills the process there.
_PAUSE_MID_QUANTIZE = textwrap.dedent("""
    import sys, time
    import bora_tools.gguf.quantize as quantize
    original = quantize.tensor_done
    def paused(index, total, name, events):
        if index == 3:
            print("QUANTIZING", flush=True)
            time.sleep(600)
        original(index, total, name, events)
    quantize.tensor_done = paused
    from bora_tools.cli import cli
    cli(sys.argv[1:], prog_name="bora-tools")
""")


@pytest.mark.skipif(sys.platform != "linux", reason="uses Linux signals")
@pytest.mark.slow
def test_sigkill_mid_quantize_leaves_nothing_and_the_next_run_cleans_up(models, tmp_path):
    out = tmp_path / "q.gguf"
    args = ["export-gguf", models["adapter"], "--base", models["llama"], "--merge", "--out", out, "--outtype",
            "q4_k_m", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", _PAUSE_MID_QUANTIZE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "QUANTIZING", proc.stderr.read()
        hidden = leftovers(tmp_path, "q.gguf")
        assert len(hidden) == 2 and any(n.endswith("-intermediate") for n in hidden)  # final temporary + intermediate
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and leftovers(tmp_path, "q.gguf") == hidden
    export_gguf(models["adapter"], out, base=models["llama"], merge=True, outtype="q4_k_m")  # the next run
    assert out.exists() and not leftovers(tmp_path, "q.gguf")


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE's soft limit (Python ignores SIGXFSZ: writes beyond it fail with EFBIG); restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    yield lambda n: resource.setrlimit(resource.RLIMIT_FSIZE, (n, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.skipif(sys.platform != "linux", reason="uses Linux rlimits")
@pytest.mark.parametrize("where", ["intermediate", "llama.cpp"])
def test_full_disk_gives_one_line_and_leaves_nothing(models, tmp_path, monkeypatch, file_size_limit, where):
    import bora_tools.gguf.quantize as quantize

    out = tmp_path / "q.gguf"
    original, calls = quantize.quantize_file, []

    def limited(src, dst, **kwargs):
        calls.append(src.stat().st_size)
        file_size_limit(300_000)  # the output (0.8 MB) is larger
        return original(src, dst, **kwargs)

    if where == "intermediate":
        file_size_limit(200_000)  # the intermediate (5 MB) is larger
    else:  # the disk fills while llama.cpp writes: the limit is set once the intermediate is complete
        monkeypatch.setattr(quantize, "quantize_file", limited)
    line = one_error_line(run("export-gguf", models["llama"], "--out", out, "--outtype", "q4_k_m", "--quiet"))
    assert calls == ([] if where == "intermediate" else [pytest.approx(5_386_624, rel=0.01)])
    assert line.startswith(f"Error: writing {out} failed: ") and "file too large" in line, line
    assert line.endswith("nothing was written")
    assert not list(tmp_path.iterdir())
