"""Typed exceptions of persona-judge.

Every error the library raises on bad input derives from :class:`PersonaJudgeError`, and its
message says what to do about it. Each class also derives from the closest built-in
exception (``ValueError``, ``LookupError``, ...) so generic handlers keep working.

Example:
    >>> from pj_core.errors import ContextOverflowError, PersonaJudgeError
    >>> issubclass(ContextOverflowError, PersonaJudgeError)
    True
    >>> issubclass(ContextOverflowError, ValueError)
    True
"""

from __future__ import annotations


class PersonaJudgeError(Exception):
    """Base class of every error raised by persona-judge.

    Attributes:
        request_index: for an error raised by ``generate_batch``, the index of the request
            that caused it (its message then starts with ``request <index>: ``); else None.
    """

    request_index: int | None = None


class ModelNotFoundError(PersonaJudgeError, LookupError):
    """A model spec (alias, path or hub id) could not be resolved to local files."""


class ModelPackageMissingError(ModelNotFoundError):
    """A built-in model alias whose weights package is not installed.

    Attributes:
        install_command: the exact ``pip`` command that installs the package.
    """

    def __init__(self, message: str, install_command: str) -> None:
        super().__init__(message)
        self.install_command = install_command


class ModelLoadError(PersonaJudgeError, RuntimeError):
    """Model files were found but could not be loaded (corrupt, unsupported, ...)."""


class BackendNotInstalledError(ModelLoadError, ImportError):
    """A backend whose optional package is not installed; the message gives the pip command.

    Attributes:
        install_command: the command that installs what is missing.
    """

    def __init__(self, message: str, *, install_command: str) -> None:
        super().__init__(message)
        self.install_command = install_command


class BackendCapacityError(PersonaJudgeError, RuntimeError):
    """A backend has no room for more rows or tokens now (every sequence slot or key/value
    cell of a llama.cpp context is taken); the message names the setting to raise. Nothing
    was changed: the call can be retried when other calls have ended."""


class ModelOutputError(PersonaJudgeError, RuntimeError):
    """The model produced logits that cannot be sampled (NaN): broken weights, or a numeric
    overflow in a low-precision dtype."""


class InvalidModelOptionError(PersonaJudgeError, ValueError):
    """A ``device`` or ``dtype`` given to ``load_model`` is unknown or unavailable."""


class InvalidPromptError(PersonaJudgeError, ValueError):
    """A prompt or conversation is malformed (empty, wrong roles, wrong types, ...)."""


class InvalidPersonaError(PersonaJudgeError, ValueError):
    """A persona or preference text is unusable (empty, too long, control characters, ...)."""


class UnknownPreferenceError(InvalidPersonaError, LookupError):
    """A preference name that is not in the catalog.

    Attributes:
        name: the unknown name.
        suggestion: the closest catalog name, if any is close.
    """

    def __init__(self, message: str, name: str, suggestion: str | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.suggestion = suggestion


class InvalidGenerationConfigError(PersonaJudgeError, ValueError):
    """A generation setting is out of range (lookahead, temperature, top-k, ...)."""


class InvalidConstraintError(InvalidGenerationConfigError):
    """A ``response_format`` (JSON schema, regex, grammar or choice) that cannot constrain
    decoding: the wrong type, an empty choice, a schema or pattern the grammar engine cannot
    compile, or a tokenizer it cannot read. Raised before any decoding."""


class InvalidToolError(InvalidConstraintError):
    """``tools`` or ``tool_choice`` that cannot be used: not a list of tools, a tool without
    a valid name or with arguments that are not an object schema (or that the grammar engine
    cannot compile), two tools with one name, a ``tool_choice`` that names no tool. Raised
    before any decoding."""


class ContextOverflowError(PersonaJudgeError, ValueError):
    """The prompt plus the token budget do not fit in the model's context window.

    Attributes:
        prompt_tokens: tokens in the longest rendered persona prompt.
        max_new_tokens: the requested budget.
        context_window: the model's window.
    """

    # The name of the answer budget the message's hint uses (None: the message names none).
    budget_name: str | None = None

    def __init__(
        self, message: str, *, prompt_tokens: int, max_new_tokens: int, context_window: int
    ) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_window = context_window

    @classmethod
    def over_budget(
        cls,
        prompt_tokens: int,
        max_new_tokens: int,
        context_window: int,
        budget_name: str = "max_new_tokens",
    ) -> ContextOverflowError:
        """The error of a prompt plus answer budget over the window, with a hint that can be
        followed: a lower budget when one would fit, else a shorter prompt.

        Example:
            >>> print(ContextOverflowError.over_budget(100, 50, 120))  # doctest: +ELLIPSIS
            the prompt takes 100 tokens and max_new_tokens is 50: ... lower max_new_tokens to at most 20
            >>> print(ContextOverflowError.over_budget(130, 50, 120, "max_tokens"))
            the prompt alone takes 130 tokens and the context window holds 120, so no answer fits; shorten the conversation or the persona texts
        """  # noqa: E501
        room = context_window - prompt_tokens
        if room < 1:
            message = (
                f"the prompt alone takes {prompt_tokens} tokens and the context window holds "
                f"{context_window}, so no answer fits; shorten the conversation or the persona "
                "texts"
            )
        else:
            message = (
                f"the prompt takes {prompt_tokens} tokens and {budget_name} is {max_new_tokens}: "
                f"{prompt_tokens + max_new_tokens} tokens do not fit the context window of "
                f"{context_window}; shorten the conversation or the persona texts, or lower "
                f"{budget_name} to at most {room}"
            )
        error = cls(
            message,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            context_window=context_window,
        )
        error.budget_name = budget_name
        return error

    def naming_budget(self, budget_name: str) -> ContextOverflowError:
        """This error with its hint naming the budget as a caller knows it (an adapter's
        ``max_tokens``); the same error when its message names no budget.

        Example:
            >>> error = ContextOverflowError.over_budget(100, 50, 120)
            >>> str(error.naming_budget("max_tokens")).endswith("lower max_tokens to at most 20")
            True
        """
        if self.budget_name is None or self.budget_name == budget_name or not self.args:
            return self
        self.args = (str(self.args[0]).replace(self.budget_name, budget_name), *self.args[1:])
        self.budget_name = budget_name
        return self


class ProfileNotFoundError(PersonaJudgeError, KeyError):
    """No saved profile has this user id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ProfileStoreError(PersonaJudgeError, RuntimeError):
    """The profile store failed (locked too long, unreadable database, ...)."""


class ProfileStoreUnavailableError(ProfileStoreError):
    """The profile database cannot be reached now (down, restarting, refusing connections,
    or every pooled connection busy): retry later; nothing was written."""


class ProfileImportError(PersonaJudgeError, ValueError):
    """An import file is corrupt or invalid; nothing was imported."""


class EvaluationError(PersonaJudgeError, ValueError):
    """The evaluation harness got unusable input (bad settings, a results file written with
    other settings, a corrupt record, no outcomes to summarise)."""


class BenchmarkError(PersonaJudgeError, RuntimeError):
    """A benchmark could not be measured (a worker process failed, or results are missing);
    the message carries the failing worker's own error output."""


class AuthenticationError(PersonaJudgeError, PermissionError):
    """A server request with no API key, or a key the server does not know (HTTP 401)."""


class PermissionDeniedError(PersonaJudgeError, PermissionError):
    """A valid API key asked for what it may not do: another user's profile, or to
    personalise as another user (HTTP 403)."""


class ApiKeyFileError(PersonaJudgeError, ValueError):
    """An API key file or ``PJ_API_KEYS`` value that cannot be read: not found, not the
    format ``pj keys`` writes, or a malformed entry."""


class ServerBusyError(PersonaJudgeError, RuntimeError):
    """The scheduler's queue is full: retry after ``retry_after`` seconds (HTTP 429).

    Attributes:
        retry_after: seconds to wait before retrying (a hint).
    """

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeoutError(PersonaJudgeError, TimeoutError):
    """A request ran past its time limit and was stopped; its rows left the batch."""
