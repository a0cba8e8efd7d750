"""Where the time of one generation goes: model forwards vs everything else.

``python -m benchmarks.profile_engine [--tokens 128] [--lookahead 4] [--threads 1]
[--torch-profiler]`` runs plain ``generate``, the speculative and the lockstep engine once each
(after a warm-up) on one Koala prompt and prints, per method: tokens, forwards, seconds in
model forwards (timed by forward hooks) and seconds outside them (sampling, acceptance tests,
cache crops, Python), per token. With ``--torch-profiler`` it also prints the top operators of
the engine run by self CPU time. This is the profile that explains what bounds the engine's
speed relative to plain decoding (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_config import BenchConfig, Cell
from benchmarks.methods import ForwardCounter, run_engine, run_plain
from benchmarks.prompt_source import REPO_ROOT, load_prompts


def profile(tokens: int, lookahead: int, torch_profiler: bool) -> dict[str, Any]:
    """Profile the three methods once each; return the breakdown."""
    from pj_core.backends.hf.models import load_model
    from pj_core.engine import PersonaJudge
    from pj_core.prompts import render_ids

    config = BenchConfig.preset("targets")
    loaded = load_model(config.model)
    engine = PersonaJudge(
        loaded.model, loaded.tokenizer, context_window=loaded.context_window, eos_token_ids=()
    )
    [prompt], _ = load_prompts(1)
    plain_ids = render_ids(loaded.tokenizer, prompt, " ".join(config.personas))
    runs = {
        "plain": lambda cell: run_plain(loaded.model, plain_ids, cell, config, 0),
        "speculative": lambda cell: run_engine(engine, prompt, cell, config, 0),
        "lockstep": lambda cell: run_engine(engine, prompt, cell, config, 0),
    }
    out: dict[str, Any] = {}
    for method, run in runs.items():
        cell = Cell(method, None if method == "plain" else lookahead, tokens)
        run(Cell(method, cell.lookahead, 8))  # warm-up
        with ForwardCounter([loaded.model]) as timer:
            sample = run(cell)
        out[method] = {
            "tokens": sample.tokens,
            "seconds": sample.seconds,
            "forwards": timer.count,
            "forward_seconds": timer.seconds,
            "other_seconds": sample.seconds - timer.seconds,
            "ms_per_forward": 1000 * timer.seconds / timer.count,
            "forward_ms_per_token": 1000 * timer.seconds / sample.tokens,
            "other_ms_per_token": 1000 * (sample.seconds - timer.seconds) / sample.tokens,
            "acceptance_rate": (sample.accepted or 0) / sample.drafted if sample.drafted else None,
        }
    if torch_profiler:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            runs["speculative"](Cell("speculative", lookahead, tokens))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return out


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--torch-profiler", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/profile.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import os

    load = os.getloadavg()
    result = profile(args.tokens, args.lookahead, args.torch_profiler)
    report = {
        "tokens": args.tokens,
        "lookahead": args.lookahead,
        "threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "methods": result,
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"load average {report['load_average_before']} -> {report['load_average_after']}, "
        f"threads {report['threads']}"
    )
    print("| method | tokens | forwards | ms/forward | forward ms/token | other ms/token | α |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, r in result.items():
        alpha = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        print(
            f"| {method} | {r['tokens']} | {r['forwards']} | {r['ms_per_forward']:.1f} | "
            f"{r['forward_ms_per_token']:.1f} | {r['other_ms_per_token']:.1f} | {alpha} |"
        )


if __name__ == "__main__":
    main()
