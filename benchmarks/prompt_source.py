"""The benchmark prompts: Koala test-set requests of 40 to 200 characters.

They are read from ``../shared/data/koala_dev.jsonl`` when the checkout sits next to it,
else from the copy shipped in ``pj_core/data/koala_bench.jsonl`` (the first 16 such rows,
Apache-2.0, Koala test set; see ``pj_core/data/README.md``). Both give the same rows, in
the same order, for the first 16 prompts.

Example:
    >>> prompts, source = load_prompts(2)
    >>> len(prompts), all(40 <= len(p) <= 200 for p in prompts)
    (2, True)
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pj_core.errors import InvalidPromptError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_KOALA = REPO_ROOT.parent / "shared" / "data" / "koala_dev.jsonl"
SHIPPED_NAME = "koala_bench.jsonl"
MIN_CHARS, MAX_CHARS = 40, 200


def _rows(text: str) -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [p for p in prompts if MIN_CHARS <= len(p) <= MAX_CHARS]


def load_prompts(count: int) -> tuple[list[str], str]:
    """The first ``count`` benchmark prompts and where they came from.

    Raises:
        InvalidPromptError: fewer prompts are available than asked for.
    """
    if SHARED_KOALA.is_file():
        prompts, source = _rows(SHARED_KOALA.read_text(encoding="utf-8")), str(SHARED_KOALA)
    else:
        shipped = resources.files("pj_core.data").joinpath(SHIPPED_NAME)
        prompts, source = _rows(shipped.read_text(encoding="utf-8")), f"pj_core/data/{SHIPPED_NAME}"
    if count > len(prompts):
        raise InvalidPromptError(
            f"asked for {count} benchmark prompts but {source} has {len(prompts)}; "
            f"use --prompts {len(prompts)} or fewer"
        )
    return prompts[:count], source
