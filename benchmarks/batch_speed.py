"""Many users at once: ``PersonaJudge.generate_batch`` against the same requests run one
after another with ``generate``.

Each request has its own prompt (Koala), its own persona pair and its own seed. Every
generation runs to the full budget (the engine is built without EOS ids) so that both sides
do the same work. Throughput is total new tokens / wall time; the sequential side is run
with the speculative strategy (``generate``'s default) and with lockstep, and batched
decoding is compared with the faster of the two. Sequential and batched runs alternate
within each repeat (side by side), medians over repeats. The batch's tokens are compared
with the sequential runs' (same seeds) to report exactness.

Example:
    >>> requests_for(["Why?", "How?"], max_new_tokens=8, seed=0)[1]["personas"]
    ['Answer concisely and to the point.', 'Answer like a patient teacher.']
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks.bench_config import BenchConfig
from benchmarks.prompt_source import load_prompts
from benchmarks.report import format_number, kernels_text
from benchmarks.runner import git_commit

# One persona pair per user (cycled): users of a service do not share preferences.
PERSONA_PAIRS: tuple[tuple[str, str], ...] = (
    ("Answer with playful humour.", "Answer concisely and to the point."),
    ("Answer concisely and to the point.", "Answer like a patient teacher."),
    ("Answer formally.", "Answer with concrete examples."),
    ("Answer like a patient teacher.", "Answer with playful humour."),
)
SEQUENTIAL_STRATEGIES = ("speculative", "lockstep")


def requests_for(prompts: list[str], *, max_new_tokens: int, seed: int) -> list[dict[str, Any]]:
    """One request per prompt, each with its own persona pair and seed."""
    return [
        {
            "conversation": prompt,
            "personas": list(PERSONA_PAIRS[i % len(PERSONA_PAIRS)]),
            "seed": seed + i,
            "max_new_tokens": max_new_tokens,
            "lookahead": 4,
        }
        for i, prompt in enumerate(prompts)
    ]


def batch_sizes(requests: int) -> list[int]:
    """1, 2, 4, ... up to ``requests`` (always included)."""
    sizes = [1]
    while sizes[-1] * 2 < requests:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, requests})


def run_batch_benchmark(
    config: BenchConfig, *, requests: int, command: str, progress: bool = True
) -> dict[str, Any]:
    """Measure sequential and batched throughput for 1, 2, 4, ... ``requests`` requests."""
    from pj_core.backends.hf.models import load_model
    from pj_core.engine import PersonaJudge

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S")
    prompts, source = load_prompts(requests)
    max_new_tokens = config.token_budgets[0]
    loaded = load_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        pack_cpu_weights=config.pack_cpu_weights,
    )
    engine = PersonaJudge(
        loaded.model, loaded.tokenizer, context_window=loaded.context_window, eos_token_ids=()
    )
    all_requests = requests_for(prompts, max_new_tokens=max_new_tokens, seed=config.seed)
    sizes = batch_sizes(requests)
    load_before = os.getloadavg()
    engine.generate(**{**all_requests[0], "max_new_tokens": 4})  # warm-up, untimed
    engine.generate_batch([{**r, "max_new_tokens": 4} for r in all_requests[:2]])
    # per_request[strategy][i]: seconds of request i alone; batched[size]: seconds of a batch
    per_request: dict[str, list[list[float]]] = {
        s: [[] for _ in prompts] for s in SEQUENTIAL_STRATEGIES
    }
    batched: dict[int, list[float]] = {size: [] for size in sizes}
    identical = compared = 0
    steps = config.repeats * (len(SEQUENTIAL_STRATEGIES) * requests + len(sizes))
    bar = tqdm(total=steps, disable=not progress, unit="run", desc="batch suite")
    for _ in range(config.repeats):
        single_tokens: dict[int, list[int]] = {}
        for strategy in SEQUENTIAL_STRATEGIES:
            for i, request in enumerate(all_requests):
                started = time.perf_counter()
                result = engine.generate(**request, strategy=strategy)
                per_request[strategy][i].append(time.perf_counter() - started)
                single_tokens.setdefault(i, result.token_ids)
                bar.update(1)
        for size in sizes:
            started = time.perf_counter()
            results = engine.generate_batch(all_requests[:size])
            batched[size].append(time.perf_counter() - started)
            if size == requests:
                identical += sum(r.token_ids == single_tokens[i] for i, r in enumerate(results))
                compared += len(results)
            bar.update(1)
    bar.close()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        tokens = size * max_new_tokens
        sequential = {
            s: sum(statistics.median(per_request[s][i]) for i in range(size))
            for s in SEQUENTIAL_STRATEGIES
        }
        best = min(sequential, key=lambda s: sequential[s])
        batch_seconds = statistics.median(batched[size])
        rows.append(
            {
                "requests": size,
                "tokens": tokens,
                "sequential_tokens_per_second": {s: tokens / v for s, v in sequential.items()},
                "batched_tokens_per_second": tokens / batch_seconds,
                "speedup_vs_best_sequential": sequential[best] / batch_seconds,
                "best_sequential": best,
            }
        )
    return {
        "meta": {
            "command": command,
            "started": started_at,
            "git_commit": git_commit(),
            "model": config.model,
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(),
            "packed_linear_layers": loaded.packed_linear_layers,
            "cpu_count": os.cpu_count(),
            "max_new_tokens": max_new_tokens,
            "repeats": config.repeats,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "prompt_source": source,
        },
        "rows": rows,
        "exactness": {"identical": identical, "compared": compared},
        "target": {
            "requests": requests,
            "speedup": rows[-1]["speedup_vs_best_sequential"],
            "threshold": 2.0,
            "met": rows[-1]["speedup_vs_best_sequential"] >= 2.0,
        },
    }


def batch_markdown(report: dict[str, Any]) -> str:
    """The Markdown section of a batch report."""
    meta = report["meta"]
    target = report["target"]
    exact = report["exactness"]
    lines = [
        "# Many users at once: generate_batch",
        "",
        f"Command: `{meta['command']}`  ",
        f"Run: {meta['started']}, commit `{meta['git_commit']}`, {meta['cpu_count']} CPUs, "
        f"torch threads {meta['torch_threads']}; model `{meta['model']}` on {meta['device']} "
        f"({meta['dtype']}, {kernels_text(meta)}); {meta['max_new_tokens']} new tokens per request "
        "(EOS ignored), "
        f"λ = 4, {meta['repeats']} repeats, medians  ",
        f"Load average before: {meta['load_average_before']}, after: {meta['load_average_after']}",
        "",
        "| requests | sequential speculative (tok/s) | sequential lockstep (tok/s) | "
        "generate_batch (tok/s) | speedup vs best sequential |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        seq = row["sequential_tokens_per_second"]
        lines.append(
            f"| {row['requests']} | {format_number(seq['speculative'])} | "
            f"{format_number(seq['lockstep'])} | "
            f"{format_number(row['batched_tokens_per_second'])} | "
            f"{format_number(row['speedup_vs_best_sequential'])}x |"
        )
    lines += [
        "",
        f"Target (≥ 2x at {target['requests']} requests): "
        f"{format_number(target['speedup'])}x, {'met' if target['met'] else '**not met**'}. "
        f"Batched tokens identical to the single runs (same seeds): "
        f"{exact['identical']}/{exact['compared']} requests.",
    ]
    return "\n".join(lines) + "\n"


def write_batch_report(
    report: dict[str, Any], out_dir: Path, img_dir: Path, stem: str
) -> list[Path]:
    """Write ``<stem>_batch.json``, ``<stem>_batch.md`` and a throughput plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}_batch.json"
    md_path = out_dir / f"{stem}_batch.md"
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(batch_markdown(report))
    rows = report["rows"]
    sizes = [r["requests"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for strategy in SEQUENTIAL_STRATEGIES:
        ax.plot(
            sizes,
            [r["sequential_tokens_per_second"][strategy] for r in rows],
            marker="o",
            linestyle="--",
            label=f"one after another ({strategy})",
        )
    ax.plot(
        sizes, [r["batched_tokens_per_second"] for r in rows], marker="o", label="generate_batch"
    )
    ax.set(xlabel="requests", ylabel="total tokens per second", xticks=sizes)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    meta = report["meta"]
    ax.set_title(
        f"{meta['model']} on {meta['device']}, {meta['max_new_tokens']} tokens each, "
        f"load {meta['load_average_before'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    plot_path = img_dir / ("bench_batch.png" if stem == "latest" else f"bench_{stem}_batch.png")
    fig.savefig(plot_path, dpi=110)
    plt.close(fig)
    return [json_path, md_path, plot_path]
