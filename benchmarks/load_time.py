"""Cold vs warm model load time: the GGUF conversion cache at work.

Each run uses a fresh, empty ``PJ_CACHE_DIR``. A *cold* load (new process, empty cache)
dequantises the GGUF file and converts its tokenizer, then writes the cache; a *warm* load
(another new process, same cache) reads the cached safetensors and tokenizer.json. We report
the time spent inside ``load_model`` (torch and transformers already imported), the time to
the first answer (``load_model`` plus a one-token ``generate``, which also waits for the
background hash check of the cached files) and the whole process's wall time (Python
start-up and imports included).

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
from pj_core.engine import PersonaJudge
start = time.perf_counter()
m = load_model(sys.argv[1], device="cpu")
loaded = time.perf_counter()
pj = PersonaJudge(m.model, m.tokenizer, name=m.name, context_window=m.context_window,
                  eos_token_ids=m.eos_token_ids)
pj.generate("Hi", ["Be brief.", "Be kind."], max_new_tokens=1, seed=0)
print(json.dumps({"load_s": loaded - start, "first_answer_s": time.perf_counter() - start,
                  "name": m.name, "context_window": m.context_window}))
"""


def _timed_load(model: str, cache_dir: str) -> tuple[float, float, float]:
    env = {**os.environ, "PJ_CACHE_DIR": cache_dir, "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, model], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"load failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["load_s"]), float(result["first_answer_s"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--warm-runs", type=int, default=1, help="warm loads per cold one (same cache)"
    )
    args = parser.parse_args()
    cold_loads, warm_loads, warm_answers = [], [], []
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory(prefix="pj-load-bench-") as cache_dir:
            cold, _, cold_wall = _timed_load(args.model, cache_dir)
            cold_loads.append(cold)
            for _ in range(args.warm_runs):
                warm, answer, warm_wall = _timed_load(args.model, cache_dir)
                warm_loads.append(warm)
                warm_answers.append(answer)
                print(
                    f"run {run}: cold load_model {cold:6.2f} s (process {cold_wall:6.2f} s) | "
                    f"warm load_model {warm:5.2f} s, first answer {answer:5.2f} s "
                    f"(process {warm_wall:5.2f} s) | speed-up {cold / warm:5.1f}x",
                    flush=True,
                )
    cold_median, warm_median = statistics.median(cold_loads), statistics.median(warm_loads)
    print(
        f"median of {args.runs} cold and {len(warm_loads)} warm loads: cold {cold_median:.2f} s, "
        f"warm {warm_median:.2f} s, warm first answer {statistics.median(warm_answers):.2f} s, "
        f"speed-up {cold_median / warm_median:.1f}x"
    )


if __name__ == "__main__":
    main()
