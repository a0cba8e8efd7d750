"""One benchmark method in a fresh interpreter: ``python -m benchmarks.worker JOB OUT``.

Running every method in its own process keeps their memory apart: the reference loop's
second copy of the weights, or the engine's caches, never raise another method's peak. The
job file (JSON) names the configuration, the method, the prompts and the round; the worker
loads the model the way the library does, runs one untimed warm-up generation per cell,
then one timed generation per cell and prompt, and writes every sample to ``OUT`` (JSON).
It prints ``PROGRESS <label>`` after each timed generation so the runner can show progress.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_config import REFERENCE_METHODS, BenchConfig, Cell
from benchmarks.memory import PeakMemory, process_peak_rss_mb
from benchmarks.methods import Sample, run_engine, run_plain, run_reference


def sample_seed(config: BenchConfig, prompt_index: int, round_index: int) -> int:
    """The seed of one generation: the same for every method, so their tokens can agree."""
    return config.seed + 1000 * prompt_index + round_index


def _runner(method: str, loaded: Any, config: BenchConfig) -> Callable[[str, Cell, int], Sample]:
    """A function ``(prompt, cell, seed) -> Sample`` for ``method`` on the loaded model."""
    from pj_core.prompts import render_ids

    tokenizer = loaded.tokenizer
    if method == "plain":
        # Direct prompting: both preferences in one system message, one prompt, one context.
        persona_text = " ".join(config.personas)
        return lambda prompt, cell, seed: run_plain(
            loaded.model, render_ids(tokenizer, prompt, persona_text), cell, config, seed
        )
    if method in REFERENCE_METHODS:
        # The authors hold one copy of the weights per persona: genuinely copy them.
        models = [loaded.model] + [copy.deepcopy(loaded.model) for _ in config.personas[1:]]
        return lambda prompt, cell, seed: run_reference(
            models, [render_ids(tokenizer, prompt, p) for p in config.personas], cell, config, seed
        )
    from pj_core.engine import PersonaJudge

    # No EOS: every method does the full budget of work.
    engine = PersonaJudge(
        loaded.model,
        tokenizer,
        name=loaded.name,
        context_window=loaded.context_window,
        eos_token_ids=(),
    )
    return lambda prompt, cell, seed: run_engine(engine, prompt, cell, config, seed)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one worker job and return its JSON-ready result."""
    from pj_core.backends.hf.models import load_model

    config = BenchConfig.from_json(job["config"])
    method: str = job["method"]
    prompts: list[str] = job["prompts"]
    round_index: int = job["round"]
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    loaded = load_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        pack_cpu_weights=config.pack_cpu_weights,
    )
    load_seconds = time.perf_counter() - started
    run = _runner(method, loaded, config)
    cells = config.cells(method)
    for cell in cells:  # warm-up: first-call costs (allocator, strategy="auto" timing) untimed
        warm = Cell(cell.method, cell.lookahead, min(config.warmup_tokens, cell.max_new_tokens))
        run(prompts[0], warm, config.seed)
    load_peak = process_peak_rss_mb()
    memory = PeakMemory(loaded.device)
    samples: list[dict[str, Any]] = []
    for cell in cells:
        for prompt_index, prompt in enumerate(prompts):
            seed = sample_seed(config, prompt_index, round_index)
            memory.reset()
            sample = run(prompt, cell, seed)
            samples.append(
                {
                    **asdict(cell),
                    "prompt_index": prompt_index,
                    "round": round_index,
                    "seed": seed,
                    **asdict(sample),
                    "tokens_per_second": sample.tokens_per_second,
                    "peak_rss_mb": memory.peak_rss_mb(),
                    "peak_gpu_mb": memory.peak_gpu_mb(),
                }
            )
            print(f"PROGRESS {cell.label} prompt {prompt_index}", flush=True)
    return {
        "method": method,
        "round": round_index,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "packed_linear_layers": loaded.packed_linear_layers,
        "load_seconds": load_seconds,
        "load_peak_rss_mb": load_peak,
        "exact_cell_peaks": memory.resettable,
        "samples": samples,
    }


def main(argv: list[str]) -> int:
    """``python -m benchmarks.worker JOB OUT``."""
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_job(job)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
