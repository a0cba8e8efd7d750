"""Backends side by side (``pj bench --backend llama.cpp``): Persona-judge on llama.cpp, on
transformers, and each backend's own plain generation, on the same prompts and model.

Methods, each ``BACKEND:KIND``:

* ``transformers:plain``: ``model.generate`` on one prompt holding both persona texts;
* ``transformers:<strategy>``: the engine on the transformers backend (GGUF dequantised);
* ``llama.cpp:plain``: llama-cpp-python's own ``Llama.generate`` on that same prompt;
* ``llama.cpp:<strategy>``: the engine on the llama.cpp backend (the GGUF as it is).

Every method runs in a fresh worker process per repeat (``python -m benchmarks.backend_speed
JOB OUT``), so its whole-process peak RSS is its own (weights, caches, torch); repeats
alternate the methods, so a slow stretch of a shared machine falls on all of them. EOS is
ignored: every generation does the full budget. Both backends get the same CPU threads.

Example:
    >>> config = BackendBenchConfig(strategies=("auto",))
    >>> [f"{b}:{k}" for b, k in config.methods()]
    ['transformers:plain', 'transformers:auto', 'llama.cpp:plain', 'llama.cpp:auto']
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.bench_config import DEFAULT_PERSONAS
from pj_core.errors import BenchmarkError
from pj_core.settings import DEFAULTS

BACKEND_NAMES = ("transformers", "llama.cpp")
STRATEGIES = ("speculative", "lockstep", "auto")


@dataclass(frozen=True)
class BackendBenchConfig:
    """What the side-by-side run measures.

    Attributes:
        model: a built-in alias or a GGUF path (both backends load it).
        gguf: another GGUF file for the llama.cpp methods only (e.g. a Q4_0 copy, see
            :func:`quantized_copy`); None: the model's own file.
        lookahead: λ of the engine's methods.
        max_new_tokens: tokens per generation.
        prompts, repeats: prompts per worker, workers per method.
        strategies: the engine strategies to run on each backend.
        threads: CPU threads of both backends (None: every core this process may use).
    """

    model: str = "smollm2-135m-instruct"
    gguf: str | None = None
    lookahead: int = 4
    max_new_tokens: int = 128
    prompts: int = 2
    repeats: int = 2
    strategies: tuple[str, ...] = STRATEGIES
    threads: int | None = None
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    seed: int = 0
    personas: tuple[str, ...] = DEFAULT_PERSONAS

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise BenchmarkError(f"unknown strategies {unknown}; use some of {list(STRATEGIES)}")
        if min(self.lookahead, self.max_new_tokens, self.prompts, self.repeats) < 1:
            raise BenchmarkError("lookahead, max_new_tokens, prompts and repeats must be >= 1")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackendBenchConfig:
        """The config ``asdict`` wrote (tuples came back as lists)."""
        return cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}  # type: ignore[arg-type]
        )

    def methods(self) -> list[tuple[str, str]]:
        """``(backend, kind)`` of every method, in running order."""
        return [(b, k) for b in BACKEND_NAMES for k in ("plain", *self.strategies)]

    def thread_count(self) -> int:
        if self.threads is not None:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1


# --------------------------------------------------------------------------- in the worker


class _WithoutEOS:
    """A backend whose answers never end early (the benchmark compares equal work)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


_PLAIN_LLAMAS: dict[str, Any] = {}  # one Llama per file in a worker


def _llama_plain(config: BackendBenchConfig, path: str, prompt_ids: list[int], seed: int) -> Any:
    """llama-cpp-python's own sampling loop (``Llama.generate``) for ``max_new_tokens``."""
    from llama_cpp import Llama

    from benchmarks.methods import Sample

    llm = _PLAIN_LLAMAS.get(path)
    if llm is None:
        threads = config.thread_count()
        llm = Llama(
            model_path=path,
            n_ctx=2048,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        _PLAIN_LLAMAS[path] = llm
    llm.set_seed(seed)
    tokens: list[int] = []
    started = time.perf_counter()
    first = 0.0
    for token in llm.generate(
        prompt_ids,
        top_k=config.top_k,
        top_p=config.top_p,
        min_p=0.0,  # as the engine: top-k and top-p only
        temp=config.temperature,
        reset=True,
    ):
        tokens.append(int(token))
        first = first or time.perf_counter() - started
        if len(tokens) == config.max_new_tokens:
            break
    seconds = time.perf_counter() - started
    return Sample(
        tokens=len(tokens),
        seconds=seconds,
        first_token_seconds=first,
        forward_passes=len(tokens),  # the prefill, then one decode per token but the last
        drafted=None,
        accepted=None,
        strategy=None,
        token_ids=tokens,
    )


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Measure one method on ``job["prompts"]`` (in a fresh process)."""
    import torch

    from benchmarks.bench_config import BenchConfig, Cell
    from benchmarks.memory import process_peak_rss_mb
    from pj_core.backends.loading import load_model
    from pj_core.engine import PersonaJudge
    from pj_core.prompts import render_ids

    config = BackendBenchConfig.from_json(job["config"])
    backend, kind = job["backend"], job["kind"]
    threads = config.thread_count()
    torch.set_num_threads(threads)
    bench = BenchConfig(
        model=config.model,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        personas=config.personas,
    )
    started = time.perf_counter()
    if backend == "transformers":
        loaded: Any = load_model(config.model, device="cpu")
    else:
        loaded = load_model(config.gguf or config.model, backend="llama.cpp", n_threads=threads)
    load_seconds = time.perf_counter() - started
    tokenizer = loaded.tokenizer
    merged = " ".join(config.personas)  # plain: both preferences in one system message

    def run(prompt: str, tokens: int, seed: int) -> Any:
        from benchmarks.methods import run_engine, run_plain

        if kind == "plain" and backend == "transformers":
            cell = Cell("plain", None, tokens)
            return run_plain(loaded.model, render_ids(tokenizer, prompt, merged), cell, bench, seed)
        if kind == "plain":
            ids = render_ids(tokenizer, prompt, merged)
            short = BackendBenchConfig(**{**asdict(config), "max_new_tokens": tokens})
            return _llama_plain(short, str(loaded.path), ids, seed)
        return run_engine(engine, prompt, Cell(kind, config.lookahead, tokens), bench, seed)

    if backend == "transformers":
        engine = PersonaJudge(loaded.model, tokenizer, name=loaded.name, eos_token_ids=())
    else:
        engine = PersonaJudge.from_backend(_WithoutEOS(loaded.backend), tokenizer, name=loaded.name)
    prompts: list[str] = job["prompts"]
    run(prompts[0], 8, config.seed)  # warm-up: first-call costs (auto's timing) untimed
    samples = []
    for index, prompt in enumerate(prompts):
        seed = config.seed + 1000 * index + job["round"]
        sample = run(prompt, config.max_new_tokens, seed)
        samples.append({**asdict(sample), "tokens_per_second": sample.tokens_per_second})
        print(f"PROGRESS {backend}:{kind} prompt {index}", flush=True)
    description = loaded.backend.description if backend == "llama.cpp" else "float32"
    return {
        "method": f"{backend}:{kind}",
        "backend": backend,
        "kind": kind,
        "round": job["round"],
        "threads": threads,
        "weights": description,
        "load_seconds": load_seconds,
        "peak_rss_mb_in_process": process_peak_rss_mb(),
        "samples": samples,
    }


def main(argv: list[str]) -> int:
    """``python -m benchmarks.backend_speed JOB OUT``."""
    if len(argv) != 2:
        print("usage: python -m benchmarks.backend_speed JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_job(job)))
    return 0


# --------------------------------------------------------------------------- the run


def run_backend_benchmark(
    config: BackendBenchConfig, *, command: str, progress: bool = True
) -> dict[str, Any]:
    """Run every method ``config.repeats`` times, alternating them; return the report.

    Raises:
        BenchmarkError: a worker failed (its error output is in the message).
    """
    from tqdm import tqdm

    from benchmarks.prompt_source import load_prompts
    from benchmarks.runner import git_commit, run_worker

    prompts, source = load_prompts(config.prompts)
    methods = config.methods()
    bar = tqdm(total=len(methods) * config.repeats * config.prompts, disable=not progress)
    started = time.time()
    load_before = os.getloadavg()
    workers: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pj-bench-backends-") as tmp:
        for round_index in range(config.repeats):
            for backend, kind in methods:
                bar.set_description(f"{backend}:{kind} (repeat {round_index + 1})")
                job = {
                    "config": asdict(config),
                    "method": f"{backend}-{kind}",
                    "backend": backend,
                    "kind": kind,
                    "prompts": prompts,
                    "round": round_index,
                }
                workers.append(
                    run_worker(
                        job,
                        sys.executable,
                        Path(tmp),
                        on_progress=lambda: bar.update(1),
                        module="benchmarks.backend_speed",
                    )
                )
    bar.close()
    return {
        "meta": {
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
            "wall_seconds": time.time() - started,
            "git_commit": git_commit(),
            "threads": workers[0]["threads"],
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "prompt_source": source,
            "config": asdict(config),
        },
        "rows": summarise_backends(workers),
    }


def summarise_backends(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: median tokens/s over every sample, the largest peak RSS of its
    workers, the strategies ``auto`` chose, and ratios to the transformers engine of the
    same strategy and to llama.cpp's plain generation.

    Example:
        >>> w = lambda m, tps, rss: {"method": m, "backend": m.split(":")[0],
        ...     "kind": m.split(":")[1], "weights": "", "process_peak_rss_mb": rss,
        ...     "load_seconds": 1.0, "samples": [{"tokens_per_second": tps, "strategy": None}]}
        >>> rows = summarise_backends([w("transformers:auto", 20, 900),
        ...     w("llama.cpp:plain", 80, 300), w("llama.cpp:auto", 70, 350)])
        >>> [(r["method"], r["vs_transformers"], r["vs_llama_plain"]) for r in rows]
        [('transformers:auto', 1.0, 0.25), ('llama.cpp:plain', None, 1.0), ('llama.cpp:auto', 3.5, 0.875)]
    """  # noqa: E501
    order: list[str] = []
    by_method: dict[str, list[dict[str, Any]]] = {}
    for worker in workers:
        if worker["method"] not in by_method:
            order.append(worker["method"])
        by_method.setdefault(worker["method"], []).append(worker)
    rows: list[dict[str, Any]] = []
    for method in order:
        runs = by_method[method]
        samples = [s for run in runs for s in run["samples"]]
        rows.append(
            {
                "method": method,
                "backend": runs[0]["backend"],
                "kind": runs[0]["kind"],
                "weights": runs[0]["weights"],
                "tokens_per_second": statistics.median(s["tokens_per_second"] for s in samples),
                "peak_rss_mb": max(run["process_peak_rss_mb"] for run in runs),
                "load_seconds": statistics.median(run["load_seconds"] for run in runs),
                "strategies": sorted({s["strategy"] for s in samples if s.get("strategy")}),
                "samples": len(samples),
            }
        )
    speed = {row["method"]: row["tokens_per_second"] for row in rows}
    memory = {row["method"]: row["peak_rss_mb"] for row in rows}
    for row in rows:
        twin = f"transformers:{row['kind']}"
        row["vs_transformers"] = (
            round(row["tokens_per_second"] / speed[twin], 3) if twin in speed else None
        )
        row["rss_vs_transformers"] = (
            round(row["peak_rss_mb"] / memory[twin], 3) if twin in memory else None
        )
        plain = speed.get("llama.cpp:plain")
        row["vs_llama_plain"] = round(row["tokens_per_second"] / plain, 3) if plain else None
    return rows


def backend_markdown(report: dict[str, Any]) -> str:
    """The report's table in Markdown."""
    config = report["meta"]["config"]
    lines = [
        f"Model `{config['model']}`, λ = {config['lookahead']}, {config['max_new_tokens']} new "
        f"tokens, {config['prompts']} prompts × {config['repeats']} repeats, "
        f"{report['meta']['threads']} threads; "
        f"`{report['meta']['command']}`",
        "",
        "| method | weights | tokens/s | × transformers (same method) | × llama.cpp plain "
        "| peak RSS MB | RSS × transformers | auto chose |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['method']} | {row['weights']} | {row['tokens_per_second']:.1f} | "
            f"{_ratio(row['vs_transformers'])} | {_ratio(row['vs_llama_plain'])} | "
            f"{row['peak_rss_mb']:.0f} | {_ratio(row['rss_vs_transformers'])} | "
            f"{', '.join(row['strategies']) if row['kind'] == 'auto' else ''} |"
        )
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def write_backend_report(
    report: dict[str, Any], out_dir: Path, img_dir: Path, stem: str
) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and a bar chart ``<stem>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", img_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(backend_markdown(report) + "\n")
    rows = report["rows"]
    names = [row["method"] for row in rows]
    colors = ["tab:blue" if row["backend"] == "transformers" else "tab:orange" for row in rows]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    speed.barh(names, [row["tokens_per_second"] for row in rows], color=colors)
    speed.set_xlabel("tokens/s (median)")
    memory.barh(names, [row["peak_rss_mb"] for row in rows], color=colors)
    memory.set_xlabel("peak RSS of the process (MB)")
    memory.set_yticklabels([])
    config = report["meta"]["config"]
    figure.suptitle(
        f"{config['model']}: transformers (blue) vs llama.cpp (orange), "
        f"λ = {config['lookahead']}, {config['max_new_tokens']} tokens"
    )
    figure.tight_layout()
    figure.savefig(paths[2], dpi=110)
    plt.close(figure)
    return paths


def quantized_copy(source: str | os.PathLike[str], kind: str) -> Path:
    """A copy of the GGUF ``source`` re-quantised to ``kind`` (``"q4_0"``, ``"q8_0"``, ...)
    by llama.cpp, kept in the cache; e.g. to compare Q4_0, which llama.cpp repacks for its
    CPU kernels, with the Q4_1 that SmolLM2 ships.

    Raises:
        BenchmarkError: an unknown kind, or llama.cpp failed.
    """
    import ctypes

    from pj_core.backends.hf import model_cache
    from pj_core.backends.hf.models import gguf_file
    from pj_core.backends.llamacpp.backend import llama_cpp_module

    llama = llama_cpp_module()
    ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
    if ftype is None:
        raise BenchmarkError(f"llama.cpp has no quantisation type {kind!r} (e.g. q4_0, q8_0)")
    path = gguf_file(source)
    out = model_cache.cache_root() / "requantized" / f"{path.stem}.{kind.lower()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    status = llama.llama_model_quantize(os.fsencode(path), os.fsencode(tmp), ctypes.byref(params))
    if status != 0:
        tmp.unlink(missing_ok=True)
        raise BenchmarkError(f"llama.cpp could not quantise {path} to {kind} (status {status})")
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
