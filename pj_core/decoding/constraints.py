"""Constrained decoding: output that parses, valid by construction.

A *constraint* says which texts the answer may be: a JSON schema (also from a pydantic
model), a regular expression, a context-free grammar (Lark syntax) or a choice among
strings. It is compiled once per call against the model's tokenizer
(:func:`compile_constraint`), and a *matcher* then follows the answer token by token and
says which next tokens keep it valid (:class:`Matcher`). Masking every other token, in p and
q alike, keeps each Persona-judge round exact with respect to the judge's constrained
distribution; EOS is allowed exactly when the constraint may end there.

Terms:
    constraint: :class:`JsonSchema`, :class:`Regex`, :class:`Grammar` or :class:`Choice`.
    response format: what a caller may pass for one (:data:`ResponseFormat`): a constraint,
        a JSON schema dict, or a pydantic model class.
    matcher: the state of one answer against the constraint; ``allowed()`` is the ``[vocab]``
        boolean mask of the next tokens, ``consume``/``rollback`` move it along the answer.

The grammar engine is llguidance (a small wheel with no dependencies). Its tokenizer bridge
costs about a second to build, so it is built once per tokenizer, vocabulary size and EOS set,
and cached.

Errors: a response format of the wrong type, an empty choice, a schema, pattern or grammar
that cannot be compiled (or uses a feature the engine does not support), and a tokenizer the
engine cannot read all raise :class:`~pj_core.errors.InvalidConstraintError` from
:func:`compile_constraint`, before any decoding.

Example:
    >>> as_constraint({"type": "object", "properties": {"n": {"type": "integer"}}}).kind
    'json_schema'
    >>> as_constraint(Choice(["yes", "no"])).options
    ('yes', 'no')
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, cast

import torch
from pydantic import BaseModel

from pj_core.decoding.logits import LogitTransform, Position
from pj_core.errors import InvalidConstraintError

ConstraintKind = Literal["json_schema", "regex", "grammar", "choice"]

JSON_LAYOUT: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
"""How JSON answers are laid out: one line, ``", "`` between items and ``": "`` after keys.
Flexible whitespace would let a model pad an answer with blank lines until its budget runs
out; a schema's own ``"x-guidance"`` options override these."""


@dataclass(frozen=True)
class JsonSchema:
    """The answer is a JSON value valid against ``schema``; objects that list their
    ``properties`` admit no other keys unless the schema says ``additionalProperties``
    (:func:`closed_schema`, as strict structured output does).

    Attributes:
        schema: the JSON schema (a dict).
        model: the pydantic model it came from, if any (the parsed answer is then an instance
            of it).

    Example:
        >>> from pydantic import BaseModel
        >>> class Fruit(BaseModel):
        ...     name: str
        >>> JsonSchema.from_model(Fruit).schema["required"]
        ['name']
    """

    schema: Mapping[str, Any]
    model: type[BaseModel] | None = field(default=None, compare=False)
    kind: ClassVar[ConstraintKind] = "json_schema"

    @classmethod
    def from_model(cls, model: type[BaseModel]) -> JsonSchema:
        """The schema of a pydantic model class."""
        return cls(schema=model.model_json_schema(), model=model)

    def parse(self, text: str) -> Any:
        """The answer as data: an instance of :attr:`model`, else the decoded JSON value."""
        if self.model is not None:
            return self.model.model_validate_json(text)
        return json.loads(text)


@dataclass(frozen=True)
class Regex:
    """The answer fully matches the regular expression ``pattern`` (Rust ``regex`` syntax,
    which covers Python's common syntax; no look-around or back-references). As in Python,
    ``\\d`` and ``\\w`` are Unicode classes: write ``[0-9]`` for ASCII digits only.

    Example:
        >>> Regex(r"\\d{3}-\\d{4}").pattern
        '\\\\d{3}-\\\\d{4}'
    """

    pattern: str
    kind: ClassVar[ConstraintKind] = "regex"

    def parse(self, text: str) -> str:
        """The answer itself."""
        return text


@dataclass(frozen=True)
class Grammar:
    """The answer is a sentence of the context-free grammar ``lark`` (Lark syntax, start
    rule ``start``; llguidance's dialect, which also allows ``%json`` and regex terminals).

    Example:
        >>> Grammar('start: "yes" | "no"').lark
        'start: "yes" | "no"'
    """

    lark: str
    kind: ClassVar[ConstraintKind] = "grammar"

    def parse(self, text: str) -> str:
        """The answer itself."""
        return text


@dataclass(frozen=True)
class Choice:
    """The answer is exactly one of ``options``.

    Example:
        >>> Choice(["red", "green"]).options
        ('red', 'green')
    """

    options: tuple[str, ...]
    kind: ClassVar[ConstraintKind] = "choice"

    def __init__(self, options: Iterable[str]) -> None:
        object.__setattr__(self, "options", tuple(options))

    def parse(self, text: str) -> str:
        """The chosen option."""
        return text


Constraint = JsonSchema | Regex | Grammar | Choice
"""A compiled-to-be constraint on the answer's text."""

ResponseFormat = Constraint | Mapping[str, Any] | type[BaseModel]
"""What callers pass as ``response_format``: a constraint, a JSON schema dict, or a pydantic
model class (its JSON schema, and the answer parsed into it)."""


def as_constraint(response_format: object) -> Constraint:
    """The :data:`Constraint` a ``response_format`` stands for, checked.

    Raises:
        InvalidConstraintError: not a constraint, dict or pydantic model class; an empty
            choice, a choice with a non-string or empty option; an empty pattern or grammar.

    Example:
        >>> as_constraint(Regex("[a-z]+")).kind
        'regex'
        >>> as_constraint(Choice([]))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pj_core.errors.InvalidConstraintError: Choice needs at least one option ...
    """
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        return JsonSchema.from_model(response_format)
    if isinstance(response_format, Mapping):
        return _checked(JsonSchema(schema=dict(response_format)))
    if isinstance(response_format, JsonSchema | Regex | Grammar | Choice):
        return _checked(response_format)
    raise InvalidConstraintError(
        f"response_format must be a JSON schema dict, a pydantic model class, or "
        f"pj_core.decoding.constraints.JsonSchema/Regex/Grammar/Choice; got "
        f"{type(response_format).__name__}"
    )


def _checked(constraint: Constraint) -> Constraint:
    if isinstance(constraint, JsonSchema):
        if not isinstance(constraint.schema, Mapping):
            raise InvalidConstraintError(
                f"a JSON schema must be a dict, got {type(constraint.schema).__name__}"
            )
        try:
            json.dumps(constraint.schema)
        except (TypeError, ValueError) as exc:
            raise InvalidConstraintError(f"the JSON schema is not JSON data: {exc}") from None
    elif isinstance(constraint, Regex | Grammar):
        text = constraint.pattern if isinstance(constraint, Regex) else constraint.lark
        if not isinstance(text, str) or not text.strip():
            name = type(constraint).__name__
            raise InvalidConstraintError(f"{name} needs a non-empty string, got {text!r}")
    elif isinstance(constraint, Choice):
        if not constraint.options:
            raise InvalidConstraintError(
                "Choice needs at least one option, e.g. Choice(['yes', 'no'])"
            )
        for index, option in enumerate(constraint.options):
            if not isinstance(option, str) or not option:
                raise InvalidConstraintError(
                    f"Choice option {index} is {option!r}; every option must be a non-empty string"
                )
    return constraint


def closed_schema(schema: Any) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object schema that lists
    its ``properties`` and says nothing about other keys, as strict structured output does:
    a small model otherwise pads objects with keys it copied from the schema.

    Example:
        >>> closed_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
        {'type': 'object', 'properties': {'a': {'type': 'integer'}}, 'additionalProperties': False}
    """
    if isinstance(schema, Mapping):
        out = {key: closed_schema(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    return schema


def grammar_of(constraint: Constraint) -> str:
    """The constraint as a grammar for the engine (llguidance's format).

    Raises:
        InvalidConstraintError: a JSON schema the engine's compiler rejects outright.
    """
    from llguidance import LLMatcher

    if isinstance(constraint, JsonSchema):
        try:
            return LLMatcher.grammar_from_json_schema(
                closed_schema(dict(constraint.schema)), defaults=cast(Any, JSON_LAYOUT)
            )
        except ValueError as exc:
            raise InvalidConstraintError(f"the JSON schema cannot be compiled: {exc}") from None
    if isinstance(constraint, Regex):
        return LLMatcher.grammar_from_regex(constraint.pattern)
    if isinstance(constraint, Grammar):
        return LLMatcher.grammar_from_lark(constraint.lark)
    # A choice: a grammar whose only sentences are the options (JSON string literals are
    # Lark string literals, so any character is quoted safely).
    options = " | ".join(json.dumps(option) for option in constraint.options)
    return LLMatcher.grammar_from_lark(f"start: {options}")


class Matcher(Protocol):
    """One answer's state against a compiled constraint.

    The decoder keeps it at the answer prefix of the position it asks about: ``consume``
    appends a token, ``rollback`` takes the last ``count`` back (a rejected draft tail).
    """

    @property
    def vocab_size(self) -> int:
        """Length of the :meth:`allowed` mask (the model's vocabulary size)."""
        ...

    def allowed(self) -> torch.Tensor:
        """``[vocab]`` bool: the tokens that keep the answer valid (EOS only when it may end)."""
        ...

    def consume(self, token: int) -> None:
        """Append ``token`` to the answer; raises if the constraint does not allow it."""
        ...

    def rollback(self, count: int) -> None:
        """Take the last ``count`` tokens back."""
        ...

    def copy(self) -> Matcher:
        """An independent matcher in the same state."""
        ...

    def is_finished(self) -> bool:
        """Whether the answer may end here (the constraint accepts the text so far)."""
        ...


class LLGuidanceMatcher:
    """A :class:`Matcher` over an llguidance ``LLMatcher``."""

    def __init__(self, inner: Any, vocab_size: int, consumed: int = 0) -> None:
        self._inner = inner
        self._vocab_size = vocab_size
        self._consumed = consumed
        self._bits = torch.arange(32, dtype=torch.int32)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def allowed(self) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self._inner.compute_bitmask()), dtype=torch.int32)
        mask = ((words.unsqueeze(1) >> self._bits) & 1).flatten()[: self._vocab_size]
        return mask.bool()

    def consume(self, token: int) -> None:
        if not self._inner.consume_token(int(token)) or self._inner.is_error():
            raise ConstraintViolation(
                f"token {token} is not allowed by the constraint after {self._consumed} "
                f"tokens: {self._inner.get_error()}"
            )
        self._consumed += 1

    def rollback(self, count: int) -> None:
        if count > self._consumed or not self._inner.rollback(count):
            raise ConstraintViolation(
                f"cannot roll back {count} tokens of {self._consumed}: {self._inner.get_error()}"
            )
        self._consumed -= count

    def copy(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._inner.deep_copy(), self._vocab_size, self._consumed)

    def is_finished(self) -> bool:
        return bool(self._inner.is_accepting())


class ConstraintViolation(RuntimeError):
    """A token the constraint forbids reached the matcher: the decoder let a masked token
    through. A bug, not a user error; please report it."""


@dataclass(frozen=True)
class CompiledConstraint:
    """A constraint compiled for one tokenizer: makes a fresh :class:`Matcher` per answer.

    Example:
        >>> compiled = compile_constraint(Choice(["yes"]), tokenizer, vocab_size=v,
        ...                               eos_token_ids=[0])  # doctest: +SKIP
        >>> compiled.matcher().allowed().sum()  # doctest: +SKIP
    """

    constraint: Constraint
    grammar: str
    vocab_size: int
    bridge: Any = field(repr=False)

    def matcher(self) -> LLGuidanceMatcher:
        """A matcher at the start of a new answer."""
        from llguidance import LLMatcher

        inner = LLMatcher(self.bridge, self.grammar, log_level=0)
        if inner.is_error():
            raise InvalidConstraintError(
                f"the {self.constraint.kind} cannot be compiled: {_summary(inner.get_error())}"
            )
        return LLGuidanceMatcher(inner, self.vocab_size)

    def parse(self, text: str) -> Any:
        """The finished answer as data (see each constraint's ``parse``)."""
        return self.constraint.parse(text)


def compile_constraint(
    response_format: object,
    tokenizer: Any,
    *,
    vocab_size: int,
    eos_token_ids: Sequence[int],
) -> CompiledConstraint:
    """Check and compile a response format for ``tokenizer``; nothing is decoded.

    Args:
        response_format: see :data:`ResponseFormat`.
        tokenizer: the model's (fast) Hugging Face tokenizer.
        vocab_size: the model's vocabulary size (the length of its logits).
        eos_token_ids: the tokens that end an answer; the constraint allows them exactly
            where the answer may end.

    Raises:
        InvalidConstraintError: see :func:`as_constraint`; a schema, pattern or grammar the
            engine cannot compile or does not support (its message says what and where);
            a tokenizer the engine cannot read.
    """
    from llguidance import LLMatcher

    constraint = as_constraint(response_format)
    bridge = tokenizer_bridge(tokenizer, vocab_size, eos_token_ids)
    grammar = grammar_of(constraint)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, bridge)
    if is_error:
        raise InvalidConstraintError(
            f"the {constraint.kind.replace('_', ' ')} cannot be compiled: "
            f"{_summary(messages[0] if messages else 'unknown error')}"
        )
    return CompiledConstraint(
        constraint=constraint, grammar=grammar, vocab_size=vocab_size, bridge=bridge
    )


_BRIDGES: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], Any]] = (
    weakref.WeakKeyDictionary()
)
_BRIDGES_LOCK = threading.Lock()


def tokenizer_bridge(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """llguidance's view of ``tokenizer`` (built once per tokenizer, vocabulary size and EOS
    set, then cached: building it takes about a second).

    Raises:
        InvalidConstraintError: the tokenizer is not a fast tokenizer llguidance can read.
    """
    import llguidance.hf

    key = (int(vocab_size), tuple(sorted({int(t) for t in eos_token_ids})))
    with _BRIDGES_LOCK:
        cached = _BRIDGES.get(tokenizer, {}).get(key)
        if cached is not None:
            return cached
        try:
            bridge = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=key[0], eos_token=list(key[1]) or None
            )
        except Exception as exc:  # llguidance raises plain ValueError/RuntimeError here
            raise InvalidConstraintError(
                f"constrained decoding cannot read this tokenizer ({type(tokenizer).__name__}): "
                f"{_summary(str(exc))}; it needs a fast byte-level or SentencePiece "
                "tokenizer such as SmolLM2's or Gemma's"
            ) from None
        _BRIDGES.setdefault(tokenizer, {})[key] = bridge
        return bridge


def _summary(message: str, limit: int = 400) -> str:
    """An engine message on one line (its layout is for terminals), cut to ``limit``."""
    text = " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------- the transform


class ConstraintMask(LogitTransform):
    """The constraint as a logit transform: every token the matcher forbids gets ``-inf``.

    One instance follows one answer (the engine builds one per call, or per request of a
    batch); both personas continue the same answer, so one matcher serves every row. The
    pipeline keeps the transform at each position's answer prefix (``advance`` and
    ``rollback``); the matcher itself only moves when a mask is not cached yet, so the judge
    reuses the masks the draft computed at the same positions, and a rejected draft tail
    costs a rollback, not a recomputation. Place it last among the call's transforms, so no
    later transform can make a forbidden token possible again.

    Example:
        >>> import torch
        >>> from pj_core.decoding.logits import Position
        >>> class OnlyZero:  # a hand-written Matcher: token 0 only
        ...     vocab_size = 3
        ...     def allowed(self): return torch.tensor([True, False, False])
        ...     def consume(self, token): pass
        ...     def rollback(self, count): pass
        ...     def copy(self): return self
        ...     def is_finished(self): return True
        >>> at = Position(persona=0, role="draft", round=0, emitted=(), drafted=())
        >>> ConstraintMask(OnlyZero())(torch.zeros(3), at)
        tensor([0., -inf, -inf])
    """

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.tokens: list[int] = []  # the answer prefix the pipeline moved this transform to
        self._consumed = 0  # how many of self.tokens the matcher has consumed
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        key = position.tokens
        mask = self._masks.get(key)
        if mask is None:
            for token in self.tokens[self._consumed :]:
                self.matcher.consume(token)
            self._consumed = len(self.tokens)
            mask = _fit(self.matcher.allowed(), logits.shape[-1])
            # Masks before the emitted answer are never asked for again.
            final = len(position.emitted)
            for old in [k for k in self._masks if len(k) < final]:
                del self._masks[old]
            self._masks[key] = mask
        return logits.masked_fill(~mask, float("-inf"))

    def advance(self, token: int) -> None:
        self.tokens.append(int(token))

    def rollback(self, count: int) -> None:
        del self.tokens[len(self.tokens) - count :]
        surplus = self._consumed - len(self.tokens)
        if surplus > 0:
            self.matcher.rollback(surplus)
            self._consumed = len(self.tokens)


def _fit(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """``mask`` at the logits' length: rows the matcher does not know are forbidden."""
    if mask.shape[-1] == vocab:
        return mask
    if mask.shape[-1] > vocab:
        return mask[:vocab]
    return torch.cat([mask, torch.zeros(vocab - mask.shape[-1], dtype=torch.bool)])
