"""Evaluation prompts: loading them from a JSONL or JSON file, or from the shipped sample.

Accepted formats:

- JSONL, one object per line with a ``"prompt"`` string and an optional ``"id"``
  (``pj_core/data/koala_sample.jsonl``, ``../shared/data/koala_dev.jsonl``);
- JSON, a list of strings (``../shared/data/hh_harmless_dev.json``) or of such objects.

Rows without an id get ``"<file stem>_<row index>"``, so ids stay stable when a file is reread
(the runner keys its records by prompt id).

Example:
    >>> prompts = load_prompts("sample", limit=2)
    >>> [p.id for p in prompts]
    ['koala_0', 'koala_1']
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pj_core.errors import InvalidPromptError

SAMPLE = "sample"
"""The name that selects the shipped Koala sample (60 prompts of at most 300 characters)."""


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: a stable id and the user's request.

    Example:
        >>> EvalPrompt(id="p1", prompt="Tell me about cats.").prompt
        'Tell me about cats.'
    """

    id: str
    prompt: str


def sample_path() -> Path:
    """Path of the shipped Koala sample (``pj_core/data/koala_sample.jsonl``)."""
    return Path(__file__).resolve().parent.parent / "data" / "koala_sample.jsonl"


def load_prompts(
    source: str | os.PathLike[str] = SAMPLE,
    *,
    limit: int | None = None,
    max_chars: int | None = None,
) -> list[EvalPrompt]:
    """Read evaluation prompts, in file order.

    Args:
        source: ``"sample"`` for the shipped Koala sample, or a path to a ``.jsonl`` / ``.json``
            file in one of the formats of this module.
        limit: keep at most this many prompts (after ``max_chars`` filtering).
        max_chars: skip prompts longer than this many characters.

    Raises:
        InvalidPromptError: the file is missing, malformed, has an empty prompt or a repeated id.

    Example:
        >>> len(load_prompts("sample", limit=3, max_chars=100))
        3
    """
    if limit is not None and limit < 1:
        raise InvalidPromptError(f"limit must be at least 1, got {limit}")
    path = sample_path() if str(source) == SAMPLE else Path(source)
    if not path.is_file():
        raise InvalidPromptError(
            f"prompt file {path} does not exist: give a .jsonl/.json file or 'sample'"
        )
    rows = _read_rows(path)
    prompts: list[EvalPrompt] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        prompt = _to_prompt(row, index, path)
        if prompt.id in seen:
            raise InvalidPromptError(
                f"{path}: prompt id {prompt.id!r} appears twice; ids must be unique "
                "(results are keyed by prompt id)"
            )
        seen.add(prompt.id)
        if max_chars is not None and len(prompt.prompt) > max_chars:
            continue
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise InvalidPromptError(f"{path}: no prompt left (check the file and max_chars)")
    return prompts


def _read_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidPromptError(
                    f"{path}, line {number}: not valid JSON ({exc.msg}); each line must be an "
                    'object such as {"id": "p1", "prompt": "..."}'
                ) from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidPromptError(
            f"{path}: not valid JSON ({exc.msg}); use a list of strings or of "
            '{"id", "prompt"} objects, or a .jsonl file'
        ) from None
    if not isinstance(data, list):
        raise InvalidPromptError(f"{path}: the JSON must be a list of prompts")
    return data


def _to_prompt(row: Any, index: int, path: Path) -> EvalPrompt:
    if isinstance(row, str):
        prompt_text, prompt_id = row, None
    elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
        prompt_text, prompt_id = row["prompt"], row.get("id")
    else:
        raise InvalidPromptError(
            f"{path}, row {index}: expected a string or an object with a 'prompt' string, "
            f"got {str(row)[:80]!r}"
        )
    if not prompt_text.strip():
        raise InvalidPromptError(f"{path}, row {index}: the prompt is empty")
    return EvalPrompt(
        id=str(prompt_id) if prompt_id is not None else f"{path.stem}_{index}", prompt=prompt_text
    )
