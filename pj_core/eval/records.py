"""The evaluation's records and the append-only JSONL file that holds them.

Every record is a JSON object with a ``kind`` and a ``key``; the key says what the record is
the result of, so a rerun skips every key already in the file (resume):

- ``config``: the settings the file was written with (first line); a rerun with other
  settings is refused rather than mixing results;
- ``generation``: ``prompt_id, method, seed, text, finish_reason, stats``;
- ``pairwise``: ``judge, dimension, prompt_id, method_a, method_b, order, p_a, p_b,
  prob_first, verdict``; order ``"ab"`` shows method_a in slot A, ``"ba"`` shows it in slot B;
- ``score``: ``judge, dimension, prompt_id, method, score`` (pointwise judges);
- ``calibration``: ``judge, dimension, p_a, p_b, prob_first, verdict``: the pairwise judge on
  a content-free pair, once per dimension (its letter bias);
- ``fluency``: ``prompt_id, method, seed, repeated_trigrams, perplexity, tokens`` (the fluency
  guard of one answer, :mod:`pj_core.eval.objective`).

Each record is written as one line, then flushed and fsynced, so an interruption loses at
most the line being written. A truncated last line (no newline, not valid JSON) is cut off
when the file is opened; a bad line elsewhere is an error (the file was edited or damaged).

Example:
    >>> generation_key("koala_0", "direct", 7)
    'generation|koala_0|direct|7'
    >>> pairwise_key("pairwise", "humor", "koala_0", "persona-judge", "direct", "ba")
    'pairwise|pairwise|humor|koala_0|persona-judge|direct|ba'
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from pj_core.errors import EvaluationError

Record = dict[str, Any]
CONFIG_KEY = "config"


def generation_key(prompt_id: str, method: str, seed: int) -> str:
    """Key of one generated answer."""
    return f"generation|{prompt_id}|{method}|{seed}"


def pairwise_key(
    judge: str, dimension: str, prompt_id: str, method_a: str, method_b: str, order: str
) -> str:
    """Key of one pairwise judgment in one order."""
    return f"pairwise|{judge}|{dimension}|{prompt_id}|{method_a}|{method_b}|{order}"


def score_key(judge: str, dimension: str, prompt_id: str, method: str) -> str:
    """Key of one pointwise score."""
    return f"score|{judge}|{dimension}|{prompt_id}|{method}"


def calibration_key(judge: str, dimension: str) -> str:
    """Key of a pairwise judge's content-free calibration for one dimension."""
    return f"calibration|{judge}|{dimension}"


def fluency_key(prompt_id: str, method: str, seed: int) -> str:
    """Key of one answer's fluency guard."""
    return f"fluency|{prompt_id}|{method}|{seed}"


class ResultsLog:
    """The results JSONL: load what is there (repairing a cut-off last line), append safely.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.jsonl"
        >>> log = ResultsLog(path)
        >>> log.append({"kind": "score", "key": "k1", "score": 1.0})
        >>> _ = path.write_text(path.read_text() + '{"kind": "sco')  # an interrupted write
        >>> list(ResultsLog(path).records)
        ['k1']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.records: dict[str, Record] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        # Everything after the last newline is a line whose write never finished.
        complete, tail = lines[:-1], lines[-1]
        for number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(complete) and not tail:
                    # The last line is damaged even though its newline made it: drop it too.
                    self._truncate(len(raw) - len(line) - 1)
                    return
                raise EvaluationError(
                    f"{self.path}, line {number} is not valid JSON: the results file is "
                    "damaged; fix or delete that line, or start over with a new --out"
                ) from None
            self._remember(record, number)
        if tail.strip():
            try:
                self._remember(json.loads(tail), len(complete) + 1)
                # A complete record that only lacks its newline: keep it, add the newline.
                with self.path.open("ab") as handle:
                    handle.write(b"\n")
            except json.JSONDecodeError:
                self._truncate(len(raw) - len(tail))

    def _remember(self, record: Any, number: int) -> None:
        if not isinstance(record, dict) or "key" not in record or "kind" not in record:
            raise EvaluationError(
                f"{self.path}, line {number} is not an evaluation record (no 'kind'/'key'); "
                "is this the right file? Use a new --out to start over"
            )
        self.records[str(record["key"])] = record

    def _truncate(self, size: int) -> None:
        with self.path.open("r+b") as handle:
            handle.truncate(size)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def of_kind(self, kind: str) -> Iterator[Record]:
        """The records of one kind, in file order."""
        return (r for r in self.records.values() if r["kind"] == kind)

    def restricted(self, prompt_ids: Collection[str]) -> ResultsLog:
        """A view holding only the records of these prompts (and the config record).

        For reports: a run over the first N prompts reports on exactly those, even when the
        file holds more (a longer run that was stopped part-way). Do not append to the view.
        """
        wanted = set(prompt_ids)
        view = object.__new__(ResultsLog)
        view.path = self.path
        view.records = {
            key: record
            for key, record in self.records.items()
            if "prompt_id" not in record or record["prompt_id"] in wanted
        }
        return view

    def append(self, record: Record) -> None:
        """Write one record durably (one line, flush, fsync) and remember it."""
        if "key" not in record or "kind" not in record:
            raise EvaluationError("a record needs 'kind' and 'key'")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.records[str(record["key"])] = record
