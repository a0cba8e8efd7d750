"""``pj bench``: speed and memory of Persona-judge against plain decoding and the authors'
cost profile, and batched decoding of many users at once.

The harness lives in the repository's ``benchmarks/`` package (it measures, it is not part
of the library), so ``pj bench`` runs from a source checkout. See ``docs/benchmarks.md``.

Examples::

    pj bench --quick                 # smoke run: 1 prompt, 16 tokens, λ = 4 (a minute or two)
    pj bench --targets               # the issue's targets: λ = 4, 128 and 256 tokens
    pj bench                         # full sweep: λ 1..6 × 64, 256 tokens, then the batch suite
    pj bench --suite batch --requests 8
    pj bench --backend llama.cpp     # Persona-judge on llama.cpp vs transformers vs plain
    pj bench --backend llama.cpp --quantize q4_0   # the llama.cpp rows on a Q4_0 copy
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pj_core.errors import BenchmarkError

REPO_ROOT = Path(__file__).resolve().parents[2]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj bench``."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark speed and memory (plain generate, reference loop, engine, batching)",
        description="Compare plain generate, the authors' cost profile and the engine's "
        "strategies on the same prompts and model; write JSON, Markdown and PNG plots.",
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="smoke run with tiny settings")
    preset.add_argument(
        "--targets", action="store_true", help="λ = 4 at 128 and 256 tokens (the issue's targets)"
    )
    parser.add_argument(
        "--suite",
        choices=("speed", "batch", "all"),
        default=None,
        help="what to run (default: all for the full sweep, speed with --quick/--targets)",
    )
    parser.add_argument("--model", default=None, help="model spec (default smollm2-135m-instruct)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: as the library)"
    )
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16, ... (default: as the library)"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of: plain reference authors speculative lockstep auto defaults constrained "
        "(defaults: the shipped strength and decoder; constrained: defaults with a tool-call "
        "JSON schema; the other engine methods run at strength 0)",
    )
    parser.add_argument("--lookaheads", nargs="+", type=int, default=None, help="λ values")
    parser.add_argument("--tokens", nargs="+", type=int, default=None, help="new-token budgets")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per cell")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per prompt")
    parser.add_argument("--reference-prompts", type=int, default=None)
    parser.add_argument("--reference-repeats", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per measuring process (default: torch's; 1 on a busy machine)",
    )
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="PyTorch's default CPU linear kernels instead of oneDNN-packed weights",
    )
    parser.add_argument("--requests", type=int, default=8, help="batch suite: requests per batch")
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="batch suite: new tokens per request (default 64, 16 with --quick)",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where JSON and Markdown go (default benchmarks/results)",
    )
    parser.add_argument(
        "--img-dir",
        type=Path,
        default=None,
        help="where plots go (default docs/img; the results dir with --quick)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="file stem of the results (default: latest for the full sweep, else the preset)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--backend",
        choices=("llama.cpp",),
        default=None,
        help="compare backends instead: Persona-judge on llama.cpp and on transformers, and "
        "each backend's plain generation (λ = 4, 128 tokens unless --lookaheads/--tokens)",
    )
    parser.add_argument(
        "--gguf", default=None, help="with --backend: another GGUF file for the llama.cpp rows"
    )
    parser.add_argument(
        "--quantize",
        default=None,
        metavar="KIND",
        help="with --backend: run the llama.cpp rows on a copy re-quantised by llama.cpp "
        "(q4_0, q8_0, ...; kept in the cache)",
    )
    parser.set_defaults(func=_run)


def _import_benchmarks() -> tuple[Any, Any, Any, Any]:
    if not (REPO_ROOT / "benchmarks" / "runner.py").is_file():
        raise BenchmarkError(
            "pj bench runs from a source checkout of persona-judge (it needs the benchmarks/ "
            "folder next to pj_core/); clone the repository and install it with `make install`"
        )
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return (
        importlib.import_module("benchmarks.bench_config"),
        importlib.import_module("benchmarks.runner"),
        importlib.import_module("benchmarks.report"),
        importlib.import_module("benchmarks.batch_speed"),
    )


def _command_line(args: argparse.Namespace) -> str:
    """The ``pj bench`` command that reproduces this run (recorded with the results)."""
    words = ["pj", "bench"]
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value in (None, False):
            continue
        if key == "requests" and value == 8:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list | tuple):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _run_backends(args: argparse.Namespace) -> int:
    """``pj bench --backend llama.cpp``: :mod:`benchmarks.backend_speed`."""
    _import_benchmarks()  # the checkout's benchmarks/ on sys.path, or a clear error
    backend_speed = importlib.import_module("benchmarks.backend_speed")
    quick = bool(args.quick)
    config = backend_speed.BackendBenchConfig(
        **{
            key: value
            for key, value in {
                "model": args.model,
                "gguf": args.gguf,
                "lookahead": args.lookaheads[0] if args.lookaheads else None,
                "max_new_tokens": args.tokens[0] if args.tokens else (16 if quick else None),
                "prompts": args.prompts or (1 if quick else None),
                "repeats": args.repeats or (1 if quick else None),
                "threads": args.threads,
                "strategies": tuple(m for m in args.methods if m in backend_speed.STRATEGIES)
                if args.methods
                else None,
            }.items()
            if value is not None
        }
    )
    if args.quantize:
        path = backend_speed.quantized_copy(args.gguf or config.model, args.quantize)
        config = replace(config, gguf=str(path))
    stem = args.name or ("backends-quick" if quick else "backends")
    out_dir: Path = args.out_dir or REPO_ROOT / "benchmarks" / "results"
    img_dir: Path = args.img_dir or (out_dir if quick else REPO_ROOT / "docs" / "img")
    result = backend_speed.run_backend_benchmark(
        config, command=_command_line(args), progress=not args.no_progress
    )
    for path in backend_speed.write_backend_report(result, out_dir, img_dir, stem):
        print(f"wrote {path}")
    print(backend_speed.backend_markdown(result))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.backend is not None:
        return _run_backends(args)
    bench_config, runner, report, batch_speed = _import_benchmarks()
    name = "quick" if args.quick else "targets" if args.targets else "full"
    overrides = {
        key: value
        for key, value in {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "methods": tuple(args.methods) if args.methods else None,
            "lookaheads": tuple(args.lookaheads) if args.lookaheads else None,
            "token_budgets": tuple(args.tokens) if args.tokens else None,
            "prompts": args.prompts,
            "repeats": args.repeats,
            "reference_prompts": args.reference_prompts,
            "reference_repeats": args.reference_repeats,
            "threads": args.threads,
            "pack_cpu_weights": False if args.no_pack else None,
        }.items()
        if value is not None
    }
    config = bench_config.BenchConfig.preset(name, **overrides)
    suite = args.suite or ("all" if name == "full" else "speed")
    stem = args.name or ("latest" if name == "full" else name)
    out_dir: Path = args.out_dir or REPO_ROOT / "benchmarks" / "results"
    img_dir: Path = args.img_dir or (out_dir if name == "quick" else REPO_ROOT / "docs" / "img")
    command = _command_line(args)
    progress = not args.no_progress
    if suite in ("speed", "all"):
        result = runner.run_benchmark(config, command=command, progress=progress)
        for path in report.write_report(result, out_dir, img_dir, stem):
            print(f"wrote {path}")
        print(report.markdown_table(result))
    if suite in ("batch", "all"):
        tokens = args.batch_tokens or (16 if name == "quick" else 64)
        batch = batch_speed.run_batch_benchmark(
            replace(config, token_budgets=(tokens,)),
            requests=args.requests,
            command=command,
            progress=progress,
        )
        for path in batch_speed.write_batch_report(batch, out_dir, img_dir, stem):
            print(f"wrote {path}")
        print(batch_speed.batch_markdown(batch))
    return 0
