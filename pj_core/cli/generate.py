"""``pj generate``: answer one prompt with Persona-judge decoding and print the answer.

Examples::

    pj generate "Got any ideas for a birthday?" --persona "Be funny." --persona "Be brief."
    pj generate "Explain DNS." --preference expert --preference concise --seed 0
    pj generate "Tell me a story." --persona "..." --persona "..." --explain
    pj generate "Hi" --persona A --persona B --model gemma3-270m --strategy lockstep
    pj generate "Weather in Paris as JSON" --persona A --persona B --json-schema weather.json
    pj generate "Is this review positive?" --persona A --persona B --choice yes --choice no
    pj generate "A phone number" --persona A --persona B --regex "[0-9]{3}-[0-9]{4}"

The answer is streamed to stdout as it is generated. ``--explain`` then prints which persona
drafted and which judged each token (coloured on a terminal: green accepted, yellow
resampled by the judge, cyan bonus from the judge) and the statistics, on stderr.

``--json-schema FILE``, ``--regex R``, ``--grammar FILE`` (Lark) or ``--choice A --choice B``
constrain the answer so it parses, by construction (see :mod:`pj_core.decoding.constraints`);
at most one of them. A JSON answer is printed as the model wrote it: one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from pj_core.errors import InvalidConstraintError, InvalidPersonaError
from pj_core.results import GenerationResult, TokenTrace
from pj_core.settings import DECODERS, DEFAULTS, STRATEGIES

if TYPE_CHECKING:  # the constraints module imports torch; the pj command starts without it
    from pj_core.decoding.constraints import ResponseFormat

# ANSI colours per outcome, used only when the stream is a terminal and NO_COLOR is unset.
OUTCOME_COLOURS = {
    "accepted": "\033[32m",
    "resampled": "\033[33m",
    "bonus": "\033[36m",
    "pooled": "\033[35m",
}
RESET = "\033[0m"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj generate``."""
    from pj_core.cli.profiles import add_persona_source_arguments

    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt with Persona-judge decoding",
        description="Generate an answer whose every token is judged by two or more personas.",
    )
    parser.add_argument("prompt", help="the user's message")
    parser.add_argument(
        "--persona",
        action="append",
        default=[],
        metavar="TEXT",
        help="one persona prefix (preference text); give two or more",
    )
    add_persona_source_arguments(parser)
    parser.add_argument("--model", default=None, help="model spec (default smollm2-135m-instruct)")
    parser.add_argument(
        "--backend",
        default=None,
        help="transformers (default) or llama.cpp (the GGUF file as it is, quantised; "
        "needs llama-cpp-python)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: auto)")
    parser.add_argument(
        "--lookahead",
        type=int,
        default=None,
        help=f"λ, draft tokens per round ({DEFAULTS.lookahead})",
    )
    parser.add_argument(
        "--fixed-roles",
        action="store_true",
        help="persona 1 always drafts, persona 2 always judges (Persona-judge-Base)",
    )
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help=f"how rounds run ({DEFAULTS.strategy})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"token budget ({DEFAULTS.max_new_tokens})",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help=f"0 is greedy ({DEFAULTS.temperature})"
    )
    parser.add_argument(
        "--top-k", type=int, default=None, help=f"0 switches it off ({DEFAULTS.top_k})"
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help=f"1.0 switches it off ({DEFAULTS.top_p})"
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help="how strongly the preferences act, >= 0; 0 is Persona-judge exactly "
        f"({DEFAULTS.strength})",
    )
    parser.add_argument(
        "--neutral-system",
        default=None,
        metavar="TEXT",
        help="system text of the neutral row that --strength guides against (default: none)",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        default=None,
        help="persona-judge: rounds of draft and judge; pool: every token from the pool of "
        f"all personas ({DEFAULTS.decoder})",
    )
    parser.add_argument("--seed", type=int, default=None, help="make the answer reproducible")
    parser.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="stop string; repeatable"
    )
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="constrain the answer to JSON valid against the schema in FILE",
    )
    shape.add_argument(
        "--regex", metavar="R", default=None, help="constrain the answer to match R in full"
    )
    shape.add_argument(
        "--grammar",
        metavar="FILE",
        default=None,
        help="constrain the answer to the Lark grammar in FILE (start rule: start)",
    )
    shape.add_argument(
        "--choice",
        action="append",
        default=None,
        metavar="TEXT",
        help="constrain the answer to one of these texts; repeatable",
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also show who drafted/judged each token and the statistics (on stderr)",
    )
    parser.set_defaults(func=run)


def generation_settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``PersonaJudge.stream``: options given on the command line
    win over a profile's defaults, which win over the engine's own defaults
    (:data:`pj_core.settings.DEFAULTS`, applied by the engine to what is left unset)."""
    settings: dict[str, Any] = dict(defaults)
    given = {
        "lookahead": args.lookahead,
        "strategy": args.strategy,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "strength": args.strength,
        "neutral_system": args.neutral_system,
        "decoder": args.decoder,
    }
    settings.update({name: value for name, value in given.items() if value is not None})
    if args.fixed_roles:
        settings["alternate"] = False
    settings.update(seed=args.seed, stop=args.stop)
    return settings


def run(args: argparse.Namespace) -> int:
    """Run ``pj generate``; returns the exit code."""
    from pj_core.cli.profiles import personas_from_args
    from pj_core.decoding.generation_config import SETTING_NAMES, GenerationConfig
    from pj_core.engine import PersonaJudge
    from pj_core.prompts import normalize_conversation

    chosen = personas_from_args(args.persona, args.preference, args.profile, args.store)
    if chosen is None:
        raise InvalidPersonaError(
            'give two or more personas: --persona "Answer with humour." --persona "Be brief." '
            "(or --preference NAME / --profile USER_ID)"
        )
    personas, defaults = chosen
    settings = generation_settings(args, defaults)
    # Bad settings or text fail now, in one line, not after the model has loaded.
    GenerationConfig.create(**{k: v for k, v in settings.items() if k in SETTING_NAMES})
    normalize_conversation(args.prompt)
    load_kwargs = {"device": args.device} if args.device else {}
    engine = PersonaJudge.from_pretrained(args.model, backend=args.backend, **load_kwargs)
    result: GenerationResult | None = None
    response_format = response_format_from_args(args)
    for event in engine.stream(args.prompt, personas, response_format=response_format, **settings):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        result = event.result or result
    sys.stdout.write("\n")
    if args.explain and result is not None:
        print_explanation(result, [p.name or p.text for p in personas], sys.stderr)
    return 0


def response_format_from_args(args: argparse.Namespace) -> ResponseFormat | None:
    """The constraint the command line asks for (at most one option), or None.

    Raises:
        InvalidConstraintError: a schema or grammar file that cannot be read, or a schema
            file that is not a JSON object.
    """
    from pj_core.decoding.constraints import Choice, Grammar, JsonSchema, Regex

    if args.json_schema is not None:
        text = _read(args.json_schema, "--json-schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidConstraintError(
                f"--json-schema {args.json_schema} is not JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno})"
            ) from None
        if not isinstance(schema, dict):
            raise InvalidConstraintError(
                f"--json-schema {args.json_schema} holds a {type(schema).__name__}; a JSON "
                'schema is an object, e.g. {"type": "object", "properties": {...}}'
            )
        return JsonSchema(schema)
    if args.regex is not None:
        return Regex(args.regex)
    if args.grammar is not None:
        return Grammar(_read(args.grammar, "--grammar"))
    if args.choice is not None:
        return Choice(args.choice)
    return None


def _read(path: str, option: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise InvalidConstraintError(f"{option} {path}: {exc.strerror or exc}") from None


def _use_colour(stream: TextIO) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def explain_lines(
    result: GenerationResult, persona_labels: list[str], *, colour: bool
) -> list[str]:
    """The ``--explain`` report: a legend, the answer coloured (or marked) by outcome and
    draft persona, one row per round, and the statistics.

    Example:
        >>> from pj_core.results import GenerationStats, TokenTrace
        >>> t = TokenTrace(5, "Hi", 0, "a", 1, "b", "accepted", 0)
        >>> s = GenerationStats(1, 1, 1, 1, 0, 0, 2, 0.1, 0.1, "speculative")
        >>> r = GenerationResult("Hi", [5], s, [t], "length", 3)
        >>> explain_lines(r, ["Be funny.", "Be brief."], colour=False)[5]
        'round 0: P1 drafts, P2 judges: [Hi]'
    """
    lines = ["", "personas:"]
    lines += [f"  P{i + 1}: {label}" for i, label in enumerate(persona_labels)]
    if result.trace and result.trace[0].outcome == "pooled":
        pieces = "".join(_marked(t, colour) for t in result.trace)
        lines.append(f"every token (pooled) from the pool of all personas: {pieces}")
    else:
        lines.append("tokens by round ([accepted draft] {resampled by judge} <bonus from judge>):")
    for round_index in sorted({t.round for t in result.trace if t.outcome != "pooled"}):
        entries = [t for t in result.trace if t.round == round_index]
        first = entries[0]
        pieces = "".join(_marked(t, colour) for t in entries)
        lines.append(
            f"round {round_index}: P{first.draft_persona + 1} drafts, "
            f"P{first.judge_persona + 1} judges: {pieces}"
        )
    stats = result.stats
    lines += [
        "stats:",
        f"  tokens {stats.tokens}, rounds {stats.rounds}, drafted {stats.drafted}, "
        f"accepted {stats.accepted}, resampled {stats.resampled}, bonus {stats.bonus}",
        f"  acceptance rate {stats.acceptance_rate:.2f}, forward passes {stats.forward_passes}, "
        f"strategy {stats.strategy}",
        f"  prefill {stats.prefill_seconds:.2f} s, decode {stats.decode_seconds:.2f} s "
        f"({stats.tokens_per_second:.1f} tokens/s), finish: {result.finish_reason}",
    ]
    return lines


def _marked(entry: TokenTrace, colour: bool) -> str:
    text = entry.text.replace("\n", "\\n") or f"#{entry.token_id}"
    if colour:
        return f"{OUTCOME_COLOURS[entry.outcome]}{text}{RESET}"
    brackets = {
        "accepted": ("[", "]"),
        "resampled": ("{", "}"),
        "bonus": ("<", ">"),
        "pooled": ("(", ")"),
    }
    left, right = brackets[entry.outcome]
    return f"{left}{text}{right}"


def print_explanation(result: GenerationResult, persona_labels: list[str], stream: TextIO) -> None:
    """Write :func:`explain_lines` to ``stream``, coloured if it is a terminal."""
    for line in explain_lines(result, persona_labels, colour=_use_colour(stream)):
        stream.write(line + "\n")
