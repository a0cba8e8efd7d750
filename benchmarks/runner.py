"""Run a benchmark: every method in fresh worker processes, side by side, then summarise.

Methods are measured *side by side*: repeat ``r`` runs one worker per method in turn, then
repeat ``r + 1`` does the same, so that a slow stretch of a shared machine is spread over all
methods instead of landing on one. Before the first worker, the model is loaded once in a
throw-away process, so that no measured worker pays a one-off conversion of the weights.

Example:
    >>> config = BenchConfig.preset("quick", methods=("plain",))
    >>> total_generations(config)
    1
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.bench_config import BenchConfig
from benchmarks.prompt_source import REPO_ROOT, load_prompts
from benchmarks.summary import summarise
from pj_core.errors import BenchmarkError

STDERR_TAIL_CHARS = 3000


def total_generations(config: BenchConfig) -> int:
    """How many timed generations the run makes (the length of its progress bar)."""
    return sum(
        len(config.cells(m)) * config.prompt_count(m) * config.repeat_count(m)
        for m in config.methods
    )


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The workers import ``benchmarks`` from this checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _prepare_model(config: BenchConfig, python: str) -> float:
    """Load the model once in a throw-away process (fills the converted-weights cache)."""
    code = (
        "from pj_core.backends.hf.models import load_model; "
        f"load_model({config.model!r}, device={config.device!r}, dtype={config.dtype!r})"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [python, "-c", code], cwd=REPO_ROOT, env=worker_env(), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise BenchmarkError(
            f"loading {config.model!r} failed, so nothing was measured; fix this first:\n"
            + done.stderr[-STDERR_TAIL_CHARS:]
        )
    return time.perf_counter() - started


def run_worker(
    job: dict[str, Any],
    python: str,
    workdir: Path,
    on_progress: Callable[[], None],
    module: str = "benchmarks.worker",
) -> dict[str, Any]:
    """Run one worker process (``python -m MODULE JOB OUT``); return its result plus its
    whole-process peak RSS."""
    name = f"{job['method']}-{job['round']}"
    job_path, out_path, err_path = (workdir / f"{name}.{ext}" for ext in ("job", "out", "err"))
    job_path.write_text(json.dumps(job))
    with err_path.open("w") as stderr:
        process = subprocess.Popen(
            [python, "-m", module, str(job_path), str(out_path)],
            cwd=REPO_ROOT,
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("PROGRESS "):
                on_progress()
        # wait4 gives this child's own resource usage, hence its own peak RSS.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise BenchmarkError(
            f"the {job['method']} worker failed (exit {process.returncode}); its error:\n"
            + err_path.read_text()[-STDERR_TAIL_CHARS:]
        )
    result: dict[str, Any] = json.loads(out_path.read_text())
    kib = usage.ru_maxrss
    result["process_peak_rss_mb"] = kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024
    return result


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def run_benchmark(
    config: BenchConfig,
    *,
    command: str,
    python: str = sys.executable,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every method of ``config``; return the full JSON-ready report.

    Args:
        config: what to measure.
        command: the command line that made this run (recorded with the results).
        python: the interpreter of the workers (this one by default).
        progress: show a tqdm progress bar.

    Raises:
        BenchmarkError: a worker failed (its error output is in the message).
    """
    prompts, prompt_source = load_prompts(config.prompts)
    load_before = os.getloadavg()
    started = time.time()
    prepare_seconds = _prepare_model(config, python)
    workers: list[dict[str, Any]] = []
    rounds = max(config.repeat_count(m) for m in config.methods)
    bar = tqdm(total=total_generations(config), disable=not progress, unit="gen")
    with tempfile.TemporaryDirectory(prefix="pj-bench-") as tmp:
        for round_index in range(rounds):
            for method in config.methods:
                if round_index >= config.repeat_count(method):
                    continue
                bar.set_description(f"{method} (repeat {round_index + 1})")
                job = {
                    "config": config.to_json(),
                    "method": method,
                    "prompts": prompts[: config.prompt_count(method)],
                    "round": round_index,
                }
                workers.append(
                    run_worker(job, python, Path(tmp), on_progress=lambda: bar.update(1))
                )
    bar.close()
    first = workers[0]
    meta = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "wall_seconds": time.time() - started,
        "git_commit": git_commit(),
        "model": config.model,
        "device": first["device"],
        "dtype": first["dtype"],
        "torch_threads": first["threads"],
        "packed_linear_layers": first.get("packed_linear_layers", 0),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "prompt_source": prompt_source,
        "prepare_seconds": prepare_seconds,
        "config": config.to_json(),
    }
    return {"meta": meta, **summarise(config, workers)}
