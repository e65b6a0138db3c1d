"""Benchmark ``bora-tools export-gguf --outtype q4_k_m`` against llama.cpp's own two-step route.

The same synthetic llama-shaped bf16 model as ``bench_gguf.py`` (random
weights, ~1 GiB at 10 layers) to Q4_K_M:

- ours: one command, ``bora-tools export-gguf MODEL --out m.gguf --outtype q4_k_m``
  (a bf16 intermediate written by our streaming writer, then llama.cpp's
  quantizer from llama-cpp-python);
- llama.cpp's route: ``convert_hf_to_gguf.py MODEL --outtype f16`` from the
  llama-cpp-python sdist's ``vendor/llama.cpp``, then ``llama_model_quantize``
  (the code of ``llama-quantize``, called through llama-cpp-python, so nothing
  is compiled), with the same thread count.

Each step runs in its own child process: wall time, peak RSS (``os.wait4``),
and peak disk, sampled every 50 ms as the bytes of every file in the output
directory (hidden temporaries included). Runs alternate their order. Both
outputs are compared tensor by tensor (types, and whether the bytes are equal).

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d /tmp/sdist
    tar xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/sdist
    python scripts/bench_quant.py --llama-cpp /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --layers 10 --repeats 2 --workdir /tmp/bench-quant

Prints a markdown table of medians (and writes ``results.json`` in the
workdir). Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_gguf import build_model  # noqa: E402  (scripts/ is on sys.path when run)
from synthetic import HIDDEN  # noqa: E402

QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = int(sys.argv[3])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""

COMPARE = """
import gguf, json, sys
a, b = (gguf.GGUFReader(p) for p in sys.argv[1:3])
tb = {t.name: t for t in b.tensors}
same_type = sum(t.tensor_type == tb[t.name].tensor_type for t in a.tensors if t.name in tb)
same_bytes = sum(bytes(t.data.tobytes()) == bytes(tb[t.name].data.tobytes()) for t in a.tensors if t.name in tb)
types = {}
for t in a.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
print(json.dumps({"tensors": len(a.tensors), "other": len(b.tensors), "same_type": same_type,
                  "same_bytes": same_bytes, "types": types}))
"""


class DiskSampler:
    """The peak total size of the files in ``directory``, sampled in a thread."""

    def __init__(self, directory: Path):
        self.directory, self.peak = directory, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for entry in os.scandir(self.directory):
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:  # renamed or removed while listing
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.05)

    def __enter__(self) -> DiskSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str], *, cwd: Path | None = None) -> dict:
    """Wall time and peak RSS of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: wait4 must reap the child itself
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.PIPE)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        stdout = out.read()
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"{cmd[:3]} failed ({code}):\n{stderr.decode()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "stdout": stdout.decode()}


def ours(model: Path, outdir: Path, threads: int) -> dict:
    out = outdir / "ours-q4_k_m.gguf"
    outdir.mkdir(parents=True)
    with DiskSampler(outdir) as disk:
        r = run([sys.executable, "-m", "bora_tools.cli", "export-gguf", str(model), "--out", str(out), "--outtype",
                 "q4_k_m", "--threads", str(threads), "--quiet", "--json"])
    phases = json.loads(r.pop("stdout"))["phases"]  # our own split: write_intermediate, quantize
    steps = [{"seconds": v} for v in phases.values()]
    return {**r, "peak_disk_mib": disk.peak / 2**20, "bytes": out.stat().st_size, "steps": steps, "phases": phases}


def theirs(model: Path, outdir: Path, threads: int, llama_cpp: Path) -> dict:
    f16, out = outdir / "llama-f16.gguf", outdir / "llama-q4_k_m.gguf"
    outdir.mkdir(parents=True)
    with DiskSampler(outdir) as disk:
        convert = run([sys.executable, "convert_hf_to_gguf.py", str(model), "--outfile", str(f16), "--outtype", "f16"],
                      cwd=llama_cpp)
        quantize = run([sys.executable, "-c", QUANTIZE, str(f16), str(out), str(threads)])
    f16.unlink()
    convert.pop("stdout"), quantize.pop("stdout")
    return {"seconds": convert["seconds"] + quantize["seconds"],
            "peak_rss_mib": max(convert["peak_rss_mib"], quantize["peak_rss_mib"]),
            "peak_disk_mib": disk.peak / 2**20, "bytes": out.stat().st_size, "steps": [convert, quantize]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the unpacked sdist")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-quant"))
    ap.add_argument("--keep-model", action="store_true", help="reuse WORKDIR/model from an earlier run")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model, outdir = args.workdir / "model", args.workdir / "out"
    if args.build_only:
        build_model(model, args.layers)
        return
    if not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{args.llama_cpp}: no convert_hf_to_gguf.py (see the usage above)")
    if not (args.keep_model and (model / "model.safetensors").is_file()):
        shutil.rmtree(args.workdir, ignore_errors=True)
        # Built in a child, so that this parent stays small (no torch): a child's ru_maxrss starts from it.
        subprocess.run([sys.executable, __file__, "--build-only", "--llama-cpp", str(args.llama_cpp), "--layers",
                        str(args.layers), "--workdir", str(args.workdir)], check=True)
    shutil.rmtree(outdir, ignore_errors=True)
    size = (model / "model.safetensors").stat().st_size
    print(f"model: {args.layers} layers, hidden {HIDDEN}, bf16, {size / 2**30:.2f} GiB; {args.threads} threads",
          flush=True)
    results: dict[str, list[dict]] = {"bora-tools": [], "llama.cpp": []}
    compared = None
    for rep in range(args.repeats):
        order = ["bora-tools", "llama.cpp"] if rep % 2 == 0 else ["llama.cpp", "bora-tools"]
        for tool in order:
            # each route in its own directory: the disk sampler sees only that route's files
            r = ours(model, outdir / "ours", args.threads) if tool == "bora-tools" else \
                theirs(model, outdir / "llama", args.threads, args.llama_cpp)
            results[tool].append(r)
            steps = " + ".join(f"{s['seconds']:.1f}" for s in r["steps"])
            print(f"  {tool:11} {r['seconds']:7.1f} s ({steps})  peak RSS {r['peak_rss_mib']:6.0f} MiB  "
                  f"peak disk {r['peak_disk_mib']:6.0f} MiB  out {r['bytes'] / 2**20:.0f} MiB", flush=True)
        if compared is None:
            compared = json.loads(subprocess.run(
                [sys.executable, "-c", COMPARE, str(outdir / "ours" / "ours-q4_k_m.gguf"),
                 str(outdir / "llama" / "llama-q4_k_m.gguf")],
                check=True, capture_output=True, text=True).stdout)
            print(f"  compared: {compared}", flush=True)
        shutil.rmtree(outdir)
    print("\n| route | wall s (median) | peak RSS MiB (median) | peak disk MiB | output MiB |")
    print("|---|---|---|---|---|")
    med = {}
    for tool, runs in results.items():
        med[tool] = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_rss_mib", "peak_disk_mib")}
        print(f"| {tool} | {med[tool]['seconds']:.1f} | {med[tool]['peak_rss_mib']:.0f} | "
              f"{med[tool]['peak_disk_mib']:.0f} | {runs[0]['bytes'] / 2**20:.0f} |")
    a, b = med["bora-tools"], med["llama.cpp"]
    print(f"\nbora-tools / llama.cpp: time x{a['seconds'] / b['seconds']:.2f}, peak RSS "
          f"x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}, peak disk x{a['peak_disk_mib'] / b['peak_disk_mib']:.2f}")
    (args.workdir / "results.json").write_text(json.dumps(
        {"model_bytes": size, "layers": args.layers, "threads": args.threads, "results": results,
         "medians": med, "compared": compared}, indent=2))


if __name__ == "__main__":
    main()
