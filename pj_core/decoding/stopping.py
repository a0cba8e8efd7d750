"""Turning emitted tokens into text safely: incremental decoding and stop strings.

Example:
    >>> matcher = StopStringMatcher(["\\n\\n"])
    >>> matcher.push("Hello\\n")       # "\\n" may start the stop string: held back
    'Hello'
    >>> matcher.push("\\nBye")         # it did: the text ends before it
    ''
    >>> matcher.stopped, matcher.text
    (True, 'Hello')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# What a tokenizer's decode yields for a byte sequence that is not yet a whole character.
REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDecoder:
    """Decode a growing token list into text pieces, one piece per pushed token.

    Pieces are computed by decoding the whole list and taking the new suffix, which handles
    tokenizers whose pieces merge or change spacing depending on their neighbours. A piece
    that ends in an incomplete multi-byte character is held back until it is complete (the
    completed text is attributed to the token that completes it).

    Example:
        >>> decoder = IncrementalDecoder(lambda ids: "".join(chr(96 + i) for i in ids))
        >>> decoder.push(1), decoder.push(2)
        ('a', 'b')
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._text = ""

    def push(self, token_id: int) -> str:
        """Add one token and return the text it completes ("" if none yet)."""
        self._ids.append(token_id)
        decoded = self._decode(self._ids)
        if decoded.endswith(REPLACEMENT_CHARACTER):
            return ""
        # When the tokenizer re-renders earlier text (rare: merged spacing), shown text is never
        # taken back; only what lies beyond the previous decode's length is new.
        piece = decoded[len(self._text) :]
        self._text = decoded
        return piece


class StopStringMatcher:
    """Accumulate text, cut it at the first stop string, and hold back possible stop prefixes.

    ``push`` returns the text that is safe to show now; text that could still become the start
    of a stop string is held back until it is disambiguated; ``flush`` releases it at the end.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(stop)
        self._text = ""
        self._shown = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far (cut before the stop string once one appeared)."""
        return self._text

    def push(self, piece: str) -> str:
        """Add a piece of text; return the newly safe text."""
        if self.stopped or not piece:
            return ""
        # A stop string can only newly appear in the window that overlaps the new piece.
        longest = max((len(s) for s in self._stop), default=0)
        search_from = max(0, len(self._text) - longest + 1)
        self._text += piece
        cut = min(
            (i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            self._text = self._text[:cut]
            self.stopped = True
            return self._release(len(self._text))
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """Release everything held back (the generation ended without a stop string)."""
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:length]):
                    best = length
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._shown)
        released = self._text[self._shown : upto]
        self._shown = upto
        return released
