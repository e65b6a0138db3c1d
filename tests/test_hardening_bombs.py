"""Resource bombs (issue 15): small hostile inputs that used to cost gigabytes or minutes.

Each command runs in a fresh subprocess whose peak resident memory (``VmHWM``) and time (after the
libraries are imported) are measured: a bomb is refused, or handled, within ``RSS_LIMIT`` and
``TIME_LIMIT`` (a tiny command peaks near 250 MB here, mostly torch itself).
"""

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bora_tools.core.adapter import BoraAdapter, BoraModule, save_adapter
from bora_tools.core.config import BoraConfig
from bora_tools.demo.tiny import build_model, save_model_dir

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc")

REPO_ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT = 500 * 2**20
TIME_LIMIT = 10.0

# The libraries are imported before the clock starts: the bound is on the command's work, not on start-up.
_MEASURED = textwrap.dedent("""
    import os, sys, time
    import gguf, numpy, safetensors, torch
    sys.argv[0] = "bora-tools"
    start = time.perf_counter()
    try:
        from bora_tools.cli import main
        main()
    finally:
        seconds = time.perf_counter() - start
        # VmHWM is this process's own peak (ru_maxrss would include the forking pytest's size on Linux).
        with open("/proc/self/status") as status:
            peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        with open(os.environ["BORA_RSS_FILE"], "w") as f:
            f.write(f"{peak_kib * 1024} {seconds}")
""")


def measured(tmp_path, *args):
    """``(completed process, peak RSS bytes, seconds)`` of ``bora-tools ARGS --quiet`` in a fresh process."""
    rss_file = tmp_path / f"rss-{time.monotonic_ns()}"
    env = {**os.environ, "BORA_RSS_FILE": str(rss_file), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", _MEASURED, *map(str, args), "--quiet"], capture_output=True,
                          text=True, env=env, timeout=300)
    rss_text, seconds_text = rss_file.read_text().split()
    rss, seconds = int(rss_text), float(seconds_text)
    print(f"{args[0]}: exit {proc.returncode}, peak RSS {rss / 2**20:.0f} MiB, {seconds:.1f} s")
    return proc, rss, seconds


def within_limits(proc, rss, seconds, *, code, culprit=None):
    assert rss < RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    assert seconds < TIME_LIMIT, f"{seconds:.1f} s"
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    if code:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and len(lines[0]) < 10_000, proc.stderr[:2000]
        assert culprit in lines[0], lines[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_model_dir(build_model("llama"), tmp_path_factory.mktemp("bombs") / "base")


def wide_adapter(path, *, b, r):
    """Layer 0's q_proj (64x64) and v_proj (32x64) with rank r far above min(m, n)."""
    gen = torch.Generator().manual_seed(0)
    modules = {}
    for name, m in (("model.layers.0.self_attn.q_proj", 64), ("model.layers.0.self_attn.v_proj", 32)):
        modules[name] = BoraModule(name, torch.randn(r, 64, generator=gen) * 0.1,
                                   torch.randn(m, r, generator=gen) * 0.1, torch.randn(b, b, r, generator=gen), 0.01)
    cfg = BoraConfig(r=r, bora_blocks=b, lora_alpha=r * 0.01, target_modules=["q_proj", "v_proj"])
    return save_adapter(BoraAdapter(cfg, modules), path)


@pytest.mark.parametrize("b, r", [(8, 512), (16, 1024)])
@pytest.mark.parametrize("command", ["inspect", "to-lora-full", "to-lora-8", "gguf-lora"])
@pytest.mark.slow
def test_ranks_above_min_m_n_cost_what_dw_costs(tmp_path, base, b, r, command):
    adapter = wide_adapter(tmp_path / "a", b=b, r=r)
    args = {"inspect": ["inspect", adapter, "--json"],
            "to-lora-full": ["to-lora", adapter, "--out", tmp_path / "o", "--rank", "full"],
            "to-lora-8": ["to-lora", adapter, "--out", tmp_path / "o", "--rank", "8", "--json"],
            "gguf-lora": ["export-gguf", adapter, "--base", base, "--out", tmp_path / "o.gguf"]}[command]
    proc, rss, seconds = measured(tmp_path, *args)
    within_limits(proc, rss, seconds, code=0)
    if command == "inspect":
        ranks = {m["name"]: m["rank"] for m in json.loads(proc.stdout)["modules"]}
        assert ranks == {"model.layers.0.self_attn.q_proj": 64, "model.layers.0.self_attn.v_proj": 32}


def test_dense_route_gives_the_factored_spectrum():
    from bora_tools.core.factors import delta_weight, dense_svd, factored_svd, gram_svd

    gen = torch.Generator().manual_seed(1)
    A, B, sigma = torch.randn(40, 16, generator=gen), torch.randn(24, 40, generator=gen), torch.randn(4, 4, 40)
    dense = torch.linalg.svdvals(delta_weight(A, B, sigma, 0.5, dtype=torch.float64))
    for svd in (gram_svd(A, B, sigma, 0.5), factored_svd(A, B, sigma, 0.5), dense_svd(A, B, sigma, 0.5)):
        assert svd.S.shape == (16,) and torch.allclose(svd.S, dense, rtol=1e-10)
    b8, a8 = gram_svd(A, B, sigma, 0.5, vectors=8).lora_factors(8, dtype=torch.float64)
    assert b8.shape == (24, 8) and a8.shape == (8, 16)


@pytest.mark.parametrize("vocab_size", [50_000_000, 2**40])
@pytest.mark.slow
def test_vocab_size_checked_before_padding(tmp_path, base, vocab_size):
    (tmp_path / "b").mkdir()
    for p in base.iterdir():
        (tmp_path / "b" / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((base / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "vocab_size": vocab_size}))
    proc, rss, seconds = measured(tmp_path, "export-gguf", tmp_path / "b", "--out", tmp_path / "o.gguf")
    within_limits(proc, rss, seconds, code=1, culprit="vocab_size")
    assert not (tmp_path / "o.gguf").exists()


def _legacy_bomb(path, inflated):
    """A zip-format adapter_model.bin whose data entry is ``inflated`` bytes of zeros, really deflated (~1 MB)."""
    honest = path.with_suffix(".honest")
    torch.save({"x": torch.zeros(2)}, honest)
    with zipfile.ZipFile(honest) as src, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 20)
                    for _ in range(inflated >> 20):
                        f.write(chunk)
            else:
                dst.writestr(info, src.read(info.filename))  # keeps the entry's own (stored) compression
    honest.unlink()


@pytest.mark.slow
def test_legacy_bin_bomb_refused_before_inflating(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "BORA", "r": 4, "bora_blocks": 2}))
    _legacy_bomb(adapter / "adapter_model.bin", 1 << 30)
    assert (adapter / "adapter_model.bin").stat().st_size < 8 * 2**20
    with zipfile.ZipFile(adapter / "adapter_model.bin") as z:
        assert sum(i.file_size for i in z.infolist()) > 1 << 30  # an honest archive, not a lying header
    proc, rss, seconds = measured(tmp_path, "inspect", adapter)
    within_limits(proc, rss, seconds, code=1, culprit="decompression bomb")


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern", "target_modules"])
@pytest.mark.parametrize("evil, code", [
    ("(.*){1,32}[0-9]", 1),  # backtracks exponentially in re and in regex: stopped by the time bound
    ("([a-z_.0-9]+)+Z", 0),  # hangs re; the regex engine sees at once that no Z occurs (PEFT's answer: no match)
])
@pytest.mark.slow
def test_catastrophic_backtracking_pattern_is_bounded(tmp_path, key, evil, code):
    adapter = wide_adapter(tmp_path / "a", b=2, r=4)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    if key == "target_modules":
        cfg[key] = evil if code else f"(.*(q_proj|v_proj))|{evil}"
    else:
        cfg[key] = {evil: 8}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    proc, rss, seconds = measured(tmp_path, "inspect", adapter)
    within_limits(proc, rss, seconds, code=code, culprit="takes too long to match")


def _many_keys(path, count):
    header = {f"base_model.model.junk.{i}.lora_Z.weight": {"dtype": "F32", "shape": [1],
                                                           "data_offsets": [4 * i, 4 * i + 4]} for i in range(count)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * count))


@pytest.mark.parametrize("count", [200_000, 20_000])
@pytest.mark.slow
def test_many_keys_give_one_short_line_in_bounded_memory(tmp_path, count):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "BORA", "r": 4, "bora_blocks": 2}))
    _many_keys(adapter / "adapter_model.safetensors", count)
    proc, rss, seconds = measured(tmp_path, "inspect", adapter)
    within_limits(proc, rss, seconds, code=1, culprit="more than an adapter" if count > 60_000 else "and 19990 more")
