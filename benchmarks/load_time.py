"""Cold vs warm model load time: the GGUF conversion cache at work.

Each run uses a fresh, empty ``PJ_CACHE_DIR``. A *cold* load (new process, empty cache)
dequantises the GGUF file and converts its tokenizer, then writes the cache; a *warm* load
(another new process, same cache) reads the cached safetensors and tokenizer.json. We report
the time spent inside ``load_model`` (torch and transformers already imported) and the whole
process's wall time (Python start-up and imports included).

Usage::

    python benchmarks/load_time.py                     # smollm2-135m-instruct, 3 runs
    python benchmarks/load_time.py --model gemma3-270m --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Runs in the child process: time load_model alone, print one JSON line.
_CHILD = """
import json, sys, time
import torch, transformers  # imported before the clock starts: we time loading, not imports
from transformers import AutoModelForCausalLM, AutoTokenizer
from pj_core.backends.hf.models import load_model
start = time.perf_counter()
m = load_model(sys.argv[1], device="cpu")
print(json.dumps({"load_s": time.perf_counter() - start, "name": m.name,
                  "context_window": m.context_window}))
"""


def _timed_load(model: str, cache_dir: str) -> tuple[float, float]:
    env = {**os.environ, "PJ_CACHE_DIR": cache_dir, "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, model], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"load failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["load_s"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cold_loads, warm_loads = [], []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="pj-load-bench-") as cache_dir:
            cold, cold_wall = _timed_load(args.model, cache_dir)
            warm, warm_wall = _timed_load(args.model, cache_dir)
        cold_loads.append(cold)
        warm_loads.append(warm)
        print(
            f"run {run}: cold load_model {cold:6.2f} s (process {cold_wall:6.2f} s) | "
            f"warm load_model {warm:5.2f} s (process {warm_wall:5.2f} s) | "
            f"speed-up {cold / warm:5.1f}x (process {cold_wall / warm_wall:4.1f}x)",
            flush=True,
        )
    cold_median, warm_median = statistics.median(cold_loads), statistics.median(warm_loads)
    print(
        f"median of {args.runs}: cold {cold_median:.2f} s, warm {warm_median:.2f} s, "
        f"speed-up {cold_median / warm_median:.1f}x"
    )


if __name__ == "__main__":
    main()
