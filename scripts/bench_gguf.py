"""Benchmark ``bora-tools export-gguf`` against llama.cpp's own ``convert_hf_to_gguf.py``.

Builds a synthetic llama-shaped bf16 model (random weights, a valid
LlamaConfig, a small SentencePiece ``tokenizer.model`` so that llama.cpp's
converter accepts it without a pre-tokenizer hash, vocab padded to 32000),
then converts it to GGUF with both tools, side by side and in rotating order,
each in its own subprocess so that its peak RSS is its own (``os.wait4``
returns the child's ``ru_maxrss``). Both outputs are checked to hold the same
tensors with the same types before they are deleted.

llama.cpp's converter ships in the llama-cpp-python source distribution; it is
unpacked into a temporary directory for the benchmark only:

    pip download --no-binary :all: --no-deps llama-cpp-python -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp

Usage (about 6 minutes on a 2-core CPU):

    python scripts/bench_gguf.py --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --layers 10 --repeats 2 --workdir /tmp/bench-gguf

``--arch qwen3`` or ``--arch gemma2`` builds a model of that family instead
(``FAMILY_SHAPES``: Qwen3-1.7B-like and Gemma-2-2B-like layers, vocabulary
32000, tied embeddings as those models ship), its tensor names and shapes
taken from transformers' own model class built on the meta device.

Prints a markdown table of medians and ratios (and writes ``results.json`` in
the workdir). Never imported by the package or the tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from synthetic import HIDDEN, write_model  # noqa: E402  (scripts/ is on sys.path when run)

#: Layer shapes of the other families (hidden, intermediate, heads, KV heads, head_dim).
FAMILY_SHAPES = {
    "qwen3": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16,
                                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                                    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                                    tie_word_embeddings=True)),
}


def write_family_model(path: Path, arch: str, layers: int) -> int:
    """``config.json`` and random bf16 weights of ``arch`` (names and shapes from transformers' model class)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cls_name, shape = FAMILY_SHAPES[arch]
    config = getattr(transformers, cls_name)(num_hidden_layers=layers, vocab_size=32000, bos_token_id=1,
                                             eos_token_id=2, pad_token_id=0, dtype="bfloat16", **shape)
    config.architectures = [transformers.AutoModelForCausalLM._model_mapping[type(config)].__name__]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(torch.bfloat16)  # sliced, so building stays fast
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        n = t.numel()
        tensors[name] = pool.roll(start).repeat(-(-n // pool.numel()))[:n].reshape(t.shape).clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return (path / "model.safetensors").stat().st_size


def build_model(path: Path, layers: int, arch: str = "llama") -> int:
    """Random bf16 weights in one ``model.safetensors``, a config of ``arch`` and a SentencePiece tokenizer."""
    import sentencepiece as spm

    from bora_tools.demo.tiny import TEXT

    if arch == "llama":
        size = write_model(path, layers, bos_token_id=1, eos_token_id=2)
    else:
        size = write_family_model(path, arch, layers)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 20), model_writer=buf, vocab_size=450,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                            "eos_token": "</s>", "unk_token": "<unk>"}))
    return size


def run(cmd: list[str], *, cwd: Path | None = None) -> dict:
    """Wall time and peak RSS of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return {"seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def tensor_types(path: Path) -> dict[str, str]:
    # In a child too: importing numpy here would grow the parent every later child is forked from.
    code = ("import gguf, json, sys; print(json.dumps({t.name: t.tensor_type.name "
            "for t in gguf.GGUFReader(sys.argv[1]).tensors}))")
    return json.loads(subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True,
                                     text=True).stdout)


def commands(tool: str, model: Path, out: Path, outtype: str, llama_cpp: Path) -> tuple[list[str], Path | None]:
    if tool == "bora-tools":
        return [sys.executable, "-m", "bora_tools.cli", "export-gguf", str(model), "--out", str(out),
                "--outtype", outtype, "--quiet"], None
    return [sys.executable, "convert_hf_to_gguf.py", str(model), "--outfile", str(out), "--outtype", outtype], llama_cpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, required=True, help="vendor/llama.cpp of the unpacked sdist")
    ap.add_argument("--arch", choices=["llama", *FAMILY_SHAPES], default="llama")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--outtypes", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-gguf"))
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.workdir / "model"
    if args.build_only:
        build_model(model, args.layers, args.arch)
        return
    if not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{args.llama_cpp}: no convert_hf_to_gguf.py (see the usage above)")
    shutil.rmtree(args.workdir, ignore_errors=True)
    # Built in a child: a child's ru_maxrss includes the parent memory it was forked
    # from, so this parent stays small (no torch) to keep every measurement its own.
    subprocess.run([sys.executable, __file__, "--build-only", "--llama-cpp", str(args.llama_cpp), "--layers",
                    str(args.layers), "--workdir", str(args.workdir), "--arch", args.arch], check=True)
    size = (model / "model.safetensors").stat().st_size
    hidden = FAMILY_SHAPES[args.arch][1]["hidden_size"] if args.arch in FAMILY_SHAPES else HIDDEN
    print(f"model: {args.arch}, {args.layers} layers, hidden {hidden}, bf16, {size / 2**30:.2f} GiB", flush=True)
    tools = ["bora-tools", "llama.cpp"]
    results: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for outtype in args.outtypes:
            order = tools if rep % 2 == 0 else tools[::-1]
            types = {}
            for tool in order:
                out = args.workdir / f"{tool}-{outtype}.gguf"
                cmd, cwd = commands(tool, model, out, outtype, args.llama_cpp)
                r = run(cmd, cwd=cwd)
                r["bytes"] = out.stat().st_size
                types[tool] = tensor_types(out)
                out.unlink()
                results.setdefault((tool, outtype), []).append(r)
                print(f"  {outtype:5} {tool:11} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB",
                      flush=True)
            if types["bora-tools"] != types["llama.cpp"]:
                diff = {
                    k
                    for k in types["bora-tools"].keys() | types["llama.cpp"].keys()
                    if types["bora-tools"].get(k) != types["llama.cpp"].get(k)
                }
                print(f"  note: tensor types differ for {sorted(diff)[:6]}", flush=True)
    report(results, size, args)


def report(results: dict, size: int, args) -> None:
    rows = []
    print("\n| outtype | tool | wall s (median) | MiB/s read | peak RSS MiB (median) | output MiB |")
    print("|---|---|---|---|---|---|")
    for (tool, outtype), runs in results.items():
        wall = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["peak_rss_mib"] for r in runs)
        rows.append({"tool": tool, "outtype": outtype, "seconds": wall, "peak_rss_mib": rss, "runs": runs})
        print(
            f"| {outtype} | {tool} | {wall:.1f} | {size / 2**20 / wall:.0f} | {rss:.0f} | "
            f"{runs[0]['bytes'] / 2**20:.0f} |"
        )
    print()
    for outtype in args.outtypes:
        ours = next(r for r in rows if r["tool"] == "bora-tools" and r["outtype"] == outtype)
        theirs = next(r for r in rows if r["tool"] == "llama.cpp" and r["outtype"] == outtype)
        print(
            f"{outtype}: throughput x{theirs['seconds'] / ours['seconds']:.2f} of llama.cpp's, "
            f"peak RSS {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f} of llama.cpp's"
        )
    (args.workdir / "results.json").write_text(
        json.dumps({"arch": args.arch, "model_bytes": size, "layers": args.layers, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
