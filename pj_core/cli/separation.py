"""``pj eval separation``: how far each method moves answers apart for two opposite
preference sets, on objective axes, with the fluency guard beside it.

Writes ``<out>/separation.md`` (the table, also printed), ``<out>/separation.png``,
``<out>/summary.json``, ``<out>/answers.json`` (every answer with its measures) and
``<out>/cost.md`` (wall time and tokens/s per method, also printed).

Example:
    pj eval separation --limit 12 --max-new-tokens 96 --out eval-runs/separation-smollm2
    pj eval separation --set-a concise,friendly --set-b informative,unfriendly \\
        --methods direct,default --limit 2 --max-new-tokens 32 --out /tmp/pj-sep
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pj_core.cli import csv_tuple
from pj_core.eval.separation import SEPARATION_METHODS, SeparationConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``separation`` under ``pj eval``."""
    defaults = SeparationConfig()
    parser = subparsers.add_parser(
        "separation",
        help="separation of two opposite preference sets on objective axes",
        description=(
            "Answer every prompt for preference set A and for set B (same seed) with each "
            "method, and report per axis the mean separation (words, readability grade, "
            "sentiment) with a 95%% bootstrap interval, and each method's fluency guard."
        ),
    )
    parser.add_argument(
        "--set-a",
        type=csv_tuple,
        default=defaults.set_a,
        help="default %(default)s (comma-separated)",
    )
    parser.add_argument(
        "--set-b",
        type=csv_tuple,
        default=defaults.set_b,
        help="default %(default)s (comma-separated)",
    )
    parser.add_argument(
        "--methods",
        type=csv_tuple,
        default=defaults.methods,
        help=f"comma-separated, from {','.join(SEPARATION_METHODS)}, each optionally with a "
        "persona strength, e.g. default@1.5 (default: all, strength 0)",
    )
    parser.add_argument("--prompts", default=defaults.prompts, help="'sample' or a prompt file")
    parser.add_argument("--limit", type=int, default=defaults.limit, help="(default %(default)s)")
    parser.add_argument("--max-prompt-chars", type=int, default=None)
    parser.add_argument("--generator", default=defaults.generator, help="generator model spec")
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default %(default)s)"
    )
    parser.add_argument("--lookahead", type=int, default=defaults.lookahead)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--bootstrap", type=int, default=defaults.bootstrap)
    parser.add_argument(
        "--no-perplexity",
        action="store_true",
        help="skip the perplexity forward of the fluency guard (repeated 3-grams only)",
    )
    parser.add_argument("--out", type=Path, default=Path("eval-runs/separation"))
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> SeparationConfig:
    """The :class:`SeparationConfig` the command line describes."""
    return SeparationConfig(
        set_a=tuple(args.set_a),
        set_b=tuple(args.set_b),
        methods=tuple(args.methods),
        prompts=str(args.prompts),
        limit=args.limit,
        max_prompt_chars=args.max_prompt_chars,
        generator=args.generator,
        max_new_tokens=args.max_new_tokens,
        lookahead=args.lookahead,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        bootstrap=args.bootstrap,
    )


def run(args: argparse.Namespace) -> int:
    """Generate, measure and write the separation report; print its table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = config_from_args(args)  # validates before any model loads
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    from pj_core.engine import PersonaJudge
    from pj_core.eval.objective import FluencyScorer
    from pj_core.eval.separation import (
        cost_table,
        engine_generate_fn,
        markdown_table,
        run_separation,
        write_report,
    )

    engine = PersonaJudge.from_pretrained(config.generator)
    # One short answer first, so the first method timed does not pay the warm-up.
    engine.generate("Hello.", ["concise"], max_new_tokens=4, seed=0)
    fluency = None if args.no_perplexity else FluencyScorer(engine.model, engine.tokenizer).score
    summary = run_separation(
        config,
        generate=engine_generate_fn(engine, config),
        fluency=fluency,
        progress=not args.no_progress,
    )
    out = write_report(summary, args.out)
    print(markdown_table(summary), end="")
    print(f"\n{summary['definition']}\n")
    print(cost_table(summary), end="")
    files = ("separation.md", "separation.png", "answers.json", "cost.md")
    print("files: " + ", ".join(str(out / name) for name in files))
    return 0
