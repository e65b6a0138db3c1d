"""What one hostile record costs `train` before training: a 20 MB single-line text, and a chat of 4,000 turns.

Builds the tiny llama of ``bora_tools.demo.tiny`` and the two JSONL files in a scratch directory, then
times ``tokenize`` (``--max-length 128``) on each and reports the process's peak RSS. Run it once per tree
to compare (``PYTHONPATH=<tree> python scripts/bench_train_records.py big``, then ``chat``): each kind in its
own process, so the peak RSS is that record's.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(kind: str) -> None:
    from transformers import AutoTokenizer

    from bora_tools.demo.tiny import build_tokenizer
    from bora_tools.training.data import read_records, tokenize

    root = Path(tempfile.mkdtemp(prefix="bench-records-"))
    build_tokenizer().save_pretrained(root / "tok")
    if kind == "big":
        words = "The quick brown fox jumps over the lazy dog. "
        records = [{"text": words * (20_000_000 // len(words))}]
    else:
        records = [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
                                 for i in range(4000)]}]
    path = root / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = AutoTokenizer.from_pretrained(root / "tok")
    recs = read_records(path)
    start = time.perf_counter()
    tokenize(recs, tok, max_length=128)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{kind}: tokenize {seconds:.2f} s, peak RSS {peak} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "big")
