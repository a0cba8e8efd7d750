"""``pj eval``: the quality evaluation, from prompts to a win-rate table and chart.

Writes ``<out>/results.jsonl`` (every answer and judgment; rerun the same command to resume
after an interruption), ``<out>/summary.json``, ``<out>/table.md`` and a PNG chart, and prints
the table.

Example:
    pj eval --limit 40 --dimensions humor,harmless,vivid --out eval-runs/smollm2
    pj eval --prompts ../shared/data/koala_dev.jsonl --limit 2 --max-new-tokens 16 \\
        --judges embedding --out /tmp/pj-eval-smoke
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pj_core.cli import csv_tuple
from pj_core.errors import EvaluationError
from pj_core.eval.config import JUDGE_NAMES, EvalConfig
from pj_core.settings import STRATEGIES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` sub-command."""
    defaults = EvalConfig()
    parser = subparsers.add_parser(
        "eval",
        help="evaluate Persona-judge against direct prompting (win rates, CI, chart)",
        description=(
            "Generate answers with direct prompting (all preferences in one system prompt), "
            "Persona-judge, Persona-judge-Base and each single-preference prompt, judge them "
            "per dimension with a pairwise LLM judge, an implicit-reward scorer and an "
            "embedding judge, and report win rates against direct prompting with 95% "
            "bootstrap confidence intervals. Rerun the same command to resume."
        ),
    )
    parser.add_argument(
        "--prompts",
        default=defaults.prompts,
        help="'sample' (shipped Koala sample) or a .jsonl/.json prompt file",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="number of prompts (required: every prompt costs an answer per method and a "
        f"judgment per dimension and judge; the paper-size run is --limit {defaults.limit})",
    )
    parser.add_argument(
        "--max-prompt-chars", type=int, default=None, help="skip prompts longer than this"
    )
    parser.add_argument(
        "--dimensions",
        type=csv_tuple,
        default=defaults.dimensions,
        help="comma-separated catalog preferences (default humor,harmless,vivid)",
    )
    parser.add_argument(
        "--methods",
        type=csv_tuple,
        default=None,
        help="comma-separated: persona-judge, persona-judge-base, single, "
        "single:<dim> (direct always runs; default: all)",
    )
    parser.add_argument("--generator", default=defaults.generator, help="generator model spec")
    parser.add_argument("--k", type=int, default=defaults.k, help="persona prefixes (compose)")
    parser.add_argument(
        "--one-per-preference", action="store_true", help="one prefix per preference (compose)"
    )
    parser.add_argument(
        "--lookahead", type=int, default=defaults.lookahead, help="(default %(default)s)"
    )
    parser.add_argument(
        "--strategy", default=defaults.strategy, choices=STRATEGIES, help="(default %(default)s)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults.max_new_tokens,
        help="answer budget (default %(default)s, shorter than generate's to keep runs cheap)",
    )
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="(default %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="(default %(default)s)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="(default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--judges",
        type=csv_tuple,
        default=defaults.judges,
        help=f"comma-separated, from {','.join(JUDGE_NAMES)} "
        f"(default: {','.join(defaults.judges)})",
    )
    parser.add_argument(
        "--judge-model", default=defaults.judge_model, help="model spec of the pairwise judge"
    )
    parser.add_argument(
        "--reward-model",
        default=defaults.reward_model,
        help="model spec of the implicit-reward scorer",
    )
    parser.add_argument("--tie-margin", type=float, default=defaults.tie_margin)
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=defaults.bootstrap,
        help="bootstrap resamples (default %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("eval-runs/latest"),
        help="output directory (results.jsonl, summary.json, table.md, chart)",
    )
    parser.add_argument(
        "--chart", type=Path, default=None, help="where to write the PNG (default <out>/chart.png)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 is fastest "
        "when other jobs share the cores",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
    # pj eval separation ...: the objective separation report (its own options).
    from pj_core.cli import separation

    separation.register(parser.add_subparsers(dest="eval_report", required=False))


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The :class:`EvalConfig` the command line describes."""
    return EvalConfig(
        prompts=str(args.prompts),
        limit=args.limit,
        max_prompt_chars=args.max_prompt_chars,
        dimensions=tuple(args.dimensions),
        methods=tuple(args.methods) if args.methods is not None else None,
        generator=args.generator,
        k=args.k,
        one_per_preference=args.one_per_preference,
        lookahead=args.lookahead,
        strategy=args.strategy,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        judges=tuple(args.judges),
        judge_model=args.judge_model,
        reward_model=args.reward_model,
        tie_margin=args.tie_margin,
        bootstrap=args.bootstrap,
    )


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the evaluation, then write and print the report."""
    # The evaluation never needs the hub: every model is packaged or local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pj_core.eval.backends import default_backends
    from pj_core.eval.data import load_prompts
    from pj_core.eval.report import markdown_table, write_report
    from pj_core.eval.runner import run_evaluation

    if args.threads is not None:
        import torch

        # On a shared CPU, more threads than free cores make every step slower, not faster.
        torch.set_num_threads(max(1, args.threads))
    if args.limit is None or args.limit < 1:
        raise EvaluationError(
            "pj eval needs --limit N, the number of prompts: each costs an answer per method "
            "and a judgment per dimension and judge, so 40 prompts (the paper-size run) take "
            "days on a small CPU; try --limit 2 --max-new-tokens 16 for a first look"
        )
    config = config_from_args(args)
    out_dir: Path = args.out
    log = run_evaluation(
        config,
        out_dir / "results.jsonl",
        backends=default_backends(config),
        progress=not args.no_progress,
    )
    # Report on this command's prompts only, even if the file holds more (a longer run).
    prompt_ids = [
        p.id
        for p in load_prompts(config.prompts, limit=config.limit, max_chars=config.max_prompt_chars)
    ]
    summary = write_report(
        log.restricted(prompt_ids),
        out_dir,
        chart_path=args.chart,
        n_resamples=config.bootstrap,
        seed=config.seed,
    )
    print(markdown_table(summary), end="")
    print("\nwin rate: win 1, tie 0.5, loss 0; cells: rate [95% CI] (wins/ties/losses)")
    print(
        f"results: {out_dir / 'results.jsonl'}; summary: {out_dir / 'summary.json'}; "
        f"chart: {args.chart or out_dir / 'chart.png'}"
    )
    return 0
