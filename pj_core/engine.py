"""``PersonaJudge``: personalised decoding with one model and two or more persona prefixes.

The engine validates the call, renders one prompt per persona, runs a strategy
(:mod:`pj_core.decoding.speculative` or :mod:`pj_core.decoding.lockstep`) that yields emitted
tokens, and turns them into text, stop-string handling, statistics and a per-token trace.

Example:
    >>> from pj_core import PersonaJudge, Persona
    >>> pj = PersonaJudge.from_pretrained("smollm2-135m-instruct")  # doctest: +SKIP
    >>> out = pj.generate(  # doctest: +SKIP
    ...     "Got any creative ideas for a 10 year old's birthday?",
    ...     personas=[Persona(text="Answer with playful humour."),
    ...               Persona(text="Answer concisely.")],
    ...     max_new_tokens=64, seed=0)
    >>> out.text, out.stats.acceptance_rate  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import operator
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, overload

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pj_core.backends.hf.backend import HFBackend
from pj_core.backends.hf.model_cache import check_verified
from pj_core.backends.hf.models import DEFAULT_MODEL
from pj_core.backends.protocol import Backend
from pj_core.decoding.constraints import (
    CompiledConstraint,
    ConstraintMask,
    JsonSchema,
    ResponseFormat,
    compile_constraint,
)
from pj_core.decoding.generation_config import SETTING_NAMES, GenerationConfig
from pj_core.decoding.guidance import Strength
from pj_core.decoding.lockstep import lockstep_emissions
from pj_core.decoding.logits import (
    LogitPipeline,
    LogitTransform,
    TransformFactory,
    build_transforms,
)
from pj_core.decoding.pool import pool_emissions
from pj_core.decoding.rounds import Counters, Emission
from pj_core.decoding.speculative import speculative_emissions
from pj_core.decoding.stopping import IncrementalDecoder, StopStringMatcher
from pj_core.decoding.strategy_choice import (
    DEFAULT_ACCEPTANCE_RATE,
    StepTimings,
    choose_strategy,
)
from pj_core.errors import (
    ContextOverflowError,
    InvalidConstraintError,
    InvalidGenerationConfigError,
    InvalidPromptError,
    InvalidToolError,
    ModelLoadError,
    PersonaJudgeError,
)
from pj_core.results import (
    FinishReason,
    GenerationResult,
    GenerationStats,
    StrategyName,
    StreamEvent,
    TokenTrace,
    ToolCall,
    final_result,
)
from pj_core.settings import DEFAULTS, Settings
from pj_core.tools import (
    Tool,
    ToolLike,
    as_tools,
    check_tool_choice,
    parse_tool_calls,
    tool_grammar,
    tools_system_text,
)

if TYPE_CHECKING:
    from pj_core.batch import BatchRequest
    from pj_core.personas import PersonasInput

# Weight of the newest call in the running acceptance-rate estimate used by strategy="auto".
ACCEPTANCE_SMOOTHING = 0.3
# A strategy's emission generator, called like
# ``run(model, prompts, config, *, eos_ids, generator, counters, pipeline)``.
EmissionSource = Callable[..., Generator[Emission, None, None]]


class PersonaJudge:
    """Persona-judge decoding over one causal language model.

    Args:
        model: a transformers causal LM that runs with a ``DynamicCache`` (eval mode).
        tokenizer: its tokenizer.
        name: display name (defaults to the model's ``name_or_path``).
        context_window: the most tokens prompt plus answer may take (default: from the
            model's config, as :func:`pj_core.backends.hf.models.load_model` finds it).
        eos_token_ids: every id that ends the answer (default: the configs' and the
            tokenizer's EOS and the chat formats' turn-end tokens it knows, as ``load_model``
            finds them; so ``PersonaJudge(model, tokenizer)`` and ``from_pretrained`` agree).
        defaults: the settings a call's ``None`` falls back to (default
            :data:`pj_core.settings.DEFAULTS`; :data:`pj_core.settings.PAPER` decodes as the
            paper does unless a call says otherwise).

    Raises:
        ModelLoadError: the config states no context length and none was given.

    One instance is safe to call from several threads at once: every call has its own caches
    and random generator, and the model is only read.

    Example:
        >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
        >>> tokenizer = make_tiny_tokenizer()
        >>> pj = PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer)
        >>> out = pj.generate_from_ids([[2, 4, 9, 10], [2, 4, 11, 12]], max_new_tokens=5, seed=0)
        >>> len(out.token_ids) <= 5, out.finish_reason in ("eos", "length")
        (True, True)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str | None = None,
        context_window: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        defaults: Settings = DEFAULTS,
    ) -> None:
        model = model.eval()
        self._setup(
            HFBackend(model, tokenizer, eos_token_ids=eos_token_ids, context_window=context_window),
            tokenizer,
            name=name or str(getattr(model, "name_or_path", "") or type(model).__name__),
            defaults=defaults,
            model=model,
        )

    @classmethod
    def from_backend(
        cls,
        backend: Backend,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str | None = None,
        defaults: Settings = DEFAULTS,
    ) -> PersonaJudge:
        """An engine that decodes on any :class:`pj_core.backends.protocol.Backend` (its EOS
        ids and context window come from it); ``tokenizer`` renders the prompts and decodes
        the answers, so it must speak the backend's token ids.

        Example:
            >>> from pj_core.backends.hf.backend import HFBackend
            >>> from tests._tiny import make_tiny_model, make_tiny_tokenizer
            >>> tokenizer = make_tiny_tokenizer()
            >>> backend = HFBackend(make_tiny_model(len(tokenizer)), tokenizer)
            >>> pj = PersonaJudge.from_backend(backend, tokenizer, name="tiny")
            >>> len(pj.generate_from_ids([[2, 4, 9], [2, 4, 11]], max_new_tokens=3).token_ids) <= 3
            True
        """
        engine = cls.__new__(cls)
        engine._setup(
            backend, tokenizer, name=name or type(backend).__name__, defaults=defaults, model=None
        )
        return engine

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model, for what needs one besides decoding (perplexity scoring).

        Raises:
            ModelLoadError: the engine runs on another backend (:meth:`from_backend`).
        """
        if self._model is None:
            raise ModelLoadError(
                f"the engine {self.name!r} decodes on {type(self.backend).__name__}, which is "
                "no transformers model; build it with PersonaJudge(model, tokenizer) for this"
            )
        return self._model

    def _setup(
        self,
        backend: Backend,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        defaults: Settings,
        model: PreTrainedModel | None,
    ) -> None:
        self._model = model
        self.defaults = defaults
        self.tokenizer = tokenizer
        self.name = name
        # The decoding reaches the model only through the backend protocol, and the backend
        # is the one source of what ends an answer and how long a context may be.
        self.backend = backend
        self.context_window = self.backend.context_window
        self.eos_token_ids: frozenset[int] = frozenset(self.backend.eos_token_ids)
        self.vocab_size = self.backend.vocab_size
        from pj_core.prompts import max_token_chars

        # No text longer than this fits the window, whatever it says: longer prompts are refused
        # before the tokenizer lock, so a hostile one cannot hold the lock (and everyone else).
        self.max_token_chars = max_token_chars(tokenizer)
        self.max_prompt_chars = self.context_window * self.max_token_chars
        # A second tokenizer counts long prompts (see check_prompt_size) apart from the shared
        # one; copied now, before any thread can use the original.
        self._large_prompt_tokenizer = copy.deepcopy(tokenizer)
        self._large_prompt_lock = threading.Lock()
        # Fast tokenizers are Rust objects that refuse concurrent use ("Already borrowed");
        # every tokenizer call goes through this lock.
        self._tokenizer_lock = threading.Lock()
        self._auto_lock = threading.Lock()
        self._step_timings: dict[tuple[int, int], StepTimings] = {}
        self.acceptance_rate_estimate = DEFAULT_ACCEPTANCE_RATE

    def __copy__(self) -> PersonaJudge:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> PersonaJudge:
        # One engine per loaded model: a deep copy of an object holding it (an adapter's
        # model_copy(deep=True)) shares it instead of copying the weights and locks.
        return self

    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike[str] | None = DEFAULT_MODEL,
        *,
        backend: str | None = None,
        defaults: Settings = DEFAULTS,
        **load_kwargs: Any,
    ) -> PersonaJudge:
        """Load a model with :func:`pj_core.backends.hf.models.load_model` and wrap it.

        Args:
            spec: a built-in alias (default ``"smollm2-135m-instruct"``; None means the
                default too), a ``.gguf`` file, a model directory or a cached hub id.
            backend: ``"transformers"`` (default) or ``"llama.cpp"``: the GGUF file as it
                is, quantised (needs llama-cpp-python).
            defaults: the engine's default settings (see the class).
            load_kwargs: for ``load_model``: ``device``, ``dtype``, ``trust_remote_code``
                (transformers); ``n_ctx``, ``n_threads`` (llama.cpp).

        Example:
            >>> pj = PersonaJudge.from_pretrained("smollm2-135m-instruct")  # doctest: +SKIP
            >>> from pj_core.settings import PAPER
            >>> paper = PersonaJudge.from_pretrained(defaults=PAPER)  # doctest: +SKIP
            >>> fast = PersonaJudge.from_pretrained(backend="llama.cpp")  # doctest: +SKIP
        """
        from pj_core.backends.hf.models import LoadedModel
        from pj_core.backends.loading import load_model

        loaded = load_model(DEFAULT_MODEL if spec is None else spec, backend=backend, **load_kwargs)
        if not isinstance(loaded, LoadedModel):  # llama.cpp
            return cls.from_backend(
                loaded.backend, loaded.tokenizer, name=loaded.name, defaults=defaults
            )
        return cls(
            loaded.model,
            loaded.tokenizer,
            name=loaded.name,
            context_window=loaded.context_window,
            eos_token_ids=loaded.eos_token_ids,
            defaults=defaults,
        )

    # ----------------------------------------------------------------------------- public API

    def generate(
        self,
        conversation: str | Sequence[dict[str, str]],
        personas: PersonasInput,
        *,
        lookahead: int | None = None,
        alternate: bool | None = None,
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        strength: float | None = None,
        neutral_system: str | None = None,
        decoder: str | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        logit_transforms: Sequence[TransformFactory] = (),
        response_format: ResponseFormat | None = None,
        tools: Sequence[ToolLike] | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> GenerationResult:
        """Generate one answer in which every token follows a persona's judgement.

        Every setting left at ``None`` takes its value from the engine's ``defaults``
        (:data:`pj_core.settings.DEFAULTS` unless given to the constructor).

        Args:
            conversation: the user's message, or a list of ``{"role", "content"}`` messages.
            personas: two or more ``Persona`` (or preference texts / catalog names), each
                the system message of one persona prefix; or anything
                :func:`pj_core.personas.resolve_personas` composes (one preference, a
                ``PersonaProfile``, ``"user:ID"``). Also a catalog name, a ``PersonaProfile`` or
                ``"user:ID"`` (default profile store): see ``pj_core.personas.resolve_personas``.
            lookahead: λ, tokens the draft persona proposes per round.
            alternate: swap draft and judge every round (Persona-judge); False keeps persona 0
                drafting and persona 1 judging (Persona-judge-Base, two personas only).
            strategy: "speculative" (KV cache per persona, draft then judge), "lockstep" (all
                personas in one batch, one forward per token; same output), or "auto" (the
                faster one on this model and device, measured; see
                :mod:`pj_core.decoding.strategy_choice`).
            max_new_tokens: the most tokens to emit.
            temperature: 0 is greedy; temperature, top_k and top_p filter both personas alike.
            top_k: keep the k most likely tokens (0: off).
            top_p: keep the smallest set of tokens with this much mass (1.0: off).
            strength: γ >= 0, how strongly the personas' preferences act: each persona row's
                logits l become l + γ (l - l_neutral), with l_neutral from the same
                conversation with no persona text (:mod:`pj_core.decoding.guidance`); 0 is the paper
                exactly. Costs one more row per forward.
            neutral_system: the system text of the neutral row (when ``strength > 0``); None
                renders the conversation with no persona text at all.
            decoder: "persona-judge" (rounds: the draft persona proposes, the judge persona
                decides) or "pool" (every token from the log-linear pool of all personas, so
                every preference acts on every token; :mod:`pj_core.decoding.pool`). The pool
                decoder always steps the rows together (lockstep); lookahead and alternate do not
                apply to it.
            seed: makes the call reproducible; None draws fresh randomness.
            stop: strings that end the answer; the answer excludes them.
            logit_transforms: factories of :class:`pj_core.decoding.logits.LogitTransform`, each
                called once for this call; the transforms change p and q alike, before
                temperature, top-k and top-p (see :mod:`pj_core.decoding.logits`).
            response_format: constrain the answer so it parses, by construction: a JSON
                schema dict, a pydantic model class, or a
                :mod:`pj_core.decoding.constraints` ``JsonSchema``/``Regex``/``Grammar``/
                ``Choice``. Tokens the constraint forbids are masked in p and q alike (after
                every other transform), and EOS is allowed exactly where the answer may end.
            tools: tools the model may call (:class:`pj_core.tools.Tool` or dicts, OpenAI's
                function layout included): described in the system text, and the answer
                constrained so every call names a tool and has valid arguments
                (:mod:`pj_core.tools`). Not together with ``response_format``.
            tool_choice: "auto" (text or a call; default), "required"/"any" (a call), a
                tool's name (one call of it), or "none" (text only).
            parallel_tool_calls: True allows several calls in one answer (default: one).

        Returns:
            A :class:`GenerationResult` with text, token ids, stats and trace; with a
            ``response_format`` that the answer completed (``finish_reason == "eos"``),
            ``parsed`` holds it as data (a pydantic instance, the JSON value, or the text).
            With ``tools``, ``tool_calls`` holds the answer's calls (``text`` keeps the answer
            as written, call markup included).

        Raises:
            InvalidGenerationConfigError: a setting is out of range.
            InvalidConstraintError: a ``response_format`` that cannot be compiled.
            InvalidPersonaError: fewer than two personas or an invalid persona.
            InvalidPromptError: the conversation is malformed.
            ContextOverflowError: prompt plus ``max_new_tokens`` exceed the context window.

        Example:
            >>> out = pj.generate("Hi!", ["Be funny.", "Be brief."], seed=0)  # doctest: +SKIP
        """
        return final_result(
            self.stream(
                conversation,
                personas,
                lookahead=lookahead,
                alternate=alternate,
                strategy=strategy,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                strength=strength,
                neutral_system=neutral_system,
                decoder=decoder,
                seed=seed,
                stop=stop,
                logit_transforms=logit_transforms,
                response_format=response_format,
                tools=tools,
                tool_choice=tool_choice,
                parallel_tool_calls=parallel_tool_calls,
            )
        )

    def stream(
        self,
        conversation: str | Sequence[dict[str, str]],
        personas: PersonasInput,
        *,
        lookahead: int | None = None,
        alternate: bool | None = None,
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        strength: float | None = None,
        neutral_system: str | None = None,
        decoder: str | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        logit_transforms: Sequence[TransformFactory] = (),
        response_format: ResponseFormat | None = None,
        tools: Sequence[ToolLike] | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yield one :class:`StreamEvent` per emitted token, then a
        final event (``done=True``) carrying the :class:`GenerationResult`.

        Arguments are validated before the first event, when this method is called.

        Example:
            >>> for event in pj.stream("Hi!", ["Be funny.", "Be brief."]):  # doctest: +SKIP
            ...     print(event.text, end="", flush=True)
        """
        config = GenerationConfig.create(
            defaults=self.defaults,
            lookahead=lookahead,
            alternate=alternate,
            strategy=strategy,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            strength=strength,
            decoder=decoder,
            seed=seed,
            stop=stop,
        )
        rendered = self._render_call(
            conversation,
            personas,
            config.strength,
            neutral_system,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
        )
        return self.stream_prepared(
            rendered.prompts,
            rendered.names,
            config,
            logit_transforms=logit_transforms,
            neutral_prompt=rendered.neutral,
            constraint=rendered.constraint,
            tools=rendered.tools,
        )

    def count_prompt_tokens(
        self,
        conversation: str | Sequence[dict[str, str]],
        personas: PersonasInput,
        *,
        strength: float | None = None,
        neutral_system: str | None = None,
        response_format: ResponseFormat | None = None,
        tools: Sequence[ToolLike] | None = None,
        tool_choice: str | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> int:
        """The tokens a call with these arguments puts in the context window before its
        answer: the longest prompt it prefills (each persona's, with the chat template, the
        persona text and the tools' text; the neutral prompt too when the call is guided).
        ``prompt_tokens + max_new_tokens`` must fit :attr:`context_window`.

        Raises:
            PersonaJudgeError: as :meth:`generate` for the same arguments.

        Example:
            >>> pj.count_prompt_tokens("Hi!", ["Be funny.", "Be brief."])  # doctest: +SKIP
            41
        """
        config = GenerationConfig.create(defaults=self.defaults, strength=strength)
        rendered = self._render_call(
            conversation,
            personas,
            config.strength,
            neutral_system,
            response_format,
            tools,
            tool_choice,
            parallel_tool_calls,
        )
        return max(len(prompt) for prompt in [*rendered.prompts, rendered.neutral or []])

    def _render_call(
        self,
        conversation: str | Sequence[dict[str, str]],
        personas: PersonasInput,
        strength: float,
        neutral_system: str | None,
        response_format: ResponseFormat | None,
        tools: Sequence[ToolLike] | None,
        tool_choice: str | None,
        parallel_tool_calls: bool | None,
    ) -> _RenderedCall:
        """What a call prefills, as :meth:`stream` decodes it and :meth:`count_prompt_tokens`
        counts it: the output rules, each persona's prompt and the neutral prompt (guided
        calls only)."""
        conversation, constraint, checked_tools = self.prepare_output(
            conversation, response_format, tools, tool_choice, parallel_tool_calls
        )
        prompts, names = self.render_prompts(conversation, personas)
        neutral = self.render_neutral_prompt(conversation, neutral_system) if strength > 0 else None
        return _RenderedCall(prompts, names, neutral, constraint, checked_tools)

    def prepare_output(
        self,
        conversation: str | Sequence[dict[str, Any]],
        response_format: ResponseFormat | None,
        tools: Sequence[ToolLike] | None,
        tool_choice: str | None,
        parallel_tool_calls: bool | None = None,
    ) -> tuple[str | Sequence[dict[str, Any]], CompiledConstraint | None, list[Tool] | None]:
        """What a call's output must look like: its conversation (with the tools' system
        text when it has tools), its compiled constraint, and its checked tools.

        Raises:
            InvalidConstraintError: see :meth:`compile_constraint`.
            InvalidToolError: bad tools or tool_choice, or a tool whose parameters cannot be
                compiled (naming it); ``tool_choice`` without tools.
            InvalidGenerationConfigError: both ``tools`` and ``response_format``.
        """
        if tools is None:
            if tool_choice is not None or parallel_tool_calls is not None:
                given = "tool_choice" if tool_choice is not None else "parallel_tool_calls"
                raise InvalidToolError(f"{given} was given without tools")
            return conversation, self.compile_constraint(response_format), None
        if response_format is not None:
            raise InvalidGenerationConfigError(
                "give tools= or response_format=, not both: a tool call's arguments are "
                "already constrained by the tool's schema"
            )
        checked = as_tools(tools)
        choice = check_tool_choice(tool_choice, checked)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise InvalidToolError(
                f"parallel_tool_calls must be True or False, got {parallel_tool_calls!r}"
            )
        parallel = bool(parallel_tool_calls)
        turns: list[dict[str, Any]] = (
            [{"role": "user", "content": conversation}]
            if isinstance(conversation, str)
            else list(conversation)
        )
        grammar = tool_grammar(checked, choice, parallel)
        try:
            if choice not in ("auto", "required"):  # the grammar leaves some tools out
                self.compile_constraint(tool_grammar(checked, "required", parallel))
            constraint = self.compile_constraint(grammar)
        except InvalidConstraintError as exc:
            raise self._tool_at_fault(checked) or exc from None
        if choice == "none":
            # No catalogue when no call may be made: a small model shown one imitates it.
            return turns, constraint, checked
        system = {"role": "system", "content": tools_system_text(checked, choice, parallel)}
        return [system, *turns], constraint, checked

    def _tool_at_fault(self, tools: Sequence[Tool]) -> InvalidToolError | None:
        """The error naming the first tool whose schema the grammar engine rejects, if any
        (asked only once the grammar of all tools has failed)."""
        for tool in tools:
            try:
                self.compile_constraint(JsonSchema(tool.parameters))
            except InvalidConstraintError as exc:
                return InvalidToolError(f"tool {tool.name!r}: {exc}")
        return None

    def compile_constraint(
        self, response_format: ResponseFormat | None
    ) -> CompiledConstraint | None:
        """``response_format`` compiled for this model's tokenizer (None stays None).

        Raises:
            InvalidConstraintError: see :func:`pj_core.decoding.constraints.compile_constraint`.

        Example:
            >>> pj.compile_constraint({"type": "integer"}).constraint.kind  # doctest: +SKIP
            'json_schema'
        """
        if response_format is None:
            return None
        with self._tokenizer_lock:  # the bridge reads the tokenizer once, then is cached
            return compile_constraint(
                response_format,
                self.tokenizer,
                vocab_size=self.vocab_size,
                eos_token_ids=sorted(self.eos_token_ids),
            )

    def render_prompts(
        self, conversation: str | Sequence[dict[str, str]], personas: PersonasInput
    ) -> tuple[list[list[int]], list[str]]:
        """Resolve ``personas`` and render one prompt per persona, as :meth:`generate` does.

        Safe from any thread (the tokenizer is used under the engine's lock).

        Returns:
            The token ids of each persona's prompt, and each persona's display name.

        Raises:
            InvalidPersonaError, InvalidPromptError: as :meth:`generate`.

        Example:
            >>> ids, names = pj.render_prompts("Hi!", ["Be funny.", "Be brief."])  # doctest: +SKIP
        """
        from pj_core.personas import resolve_personas
        from pj_core.prompts import render_ids

        resolved = resolve_personas(personas)
        self.check_prompt_size(conversation, max((len(p.text) for p in resolved), default=0))
        with self._tokenizer_lock:
            prompts = [render_ids(self.tokenizer, conversation, p.text) for p in resolved]
        return prompts, [p.display_name for p in resolved]

    def check_prompt_size(self, conversation: object, persona_chars: int = 0) -> None:
        """Refuse, before any tokenizer work, a conversation (plus ``persona_chars`` of
        persona text) too long to fit the context window whatever it says: longer than
        :attr:`max_prompt_chars` (the window times the longest token's characters).

        Raises:
            ContextOverflowError: with ``prompt_tokens`` the least count such a text takes
                and ``max_new_tokens`` 0 (the prompt alone does not fit).
        """
        from pj_core.prompts import conversation_chars

        chars = conversation_chars(conversation) + persona_chars
        if chars <= self.context_window * LARGE_PROMPT_CHARS_PER_TOKEN:
            return
        if chars <= self.max_prompt_chars:
            tokens = self._count_large_prompt(conversation)
            if tokens > self.context_window:
                raise ContextOverflowError(
                    f"the conversation takes {tokens} tokens: more than the context window of "
                    f"{self.context_window} holds; shorten it",
                    prompt_tokens=tokens,
                    max_new_tokens=0,
                    context_window=self.context_window,
                )
            return
        at_least = -(-chars // self.max_token_chars)  # ceil: tokens such a text takes at least
        raise ContextOverflowError(
            f"the prompt has {chars} characters, so at least {at_least} tokens: more than the "
            f"context window of {self.context_window} tokens holds (at most "
            f"{self.max_prompt_chars} characters); shorten the conversation",
            prompt_tokens=at_least,
            max_new_tokens=0,
            context_window=self.context_window,
        )

    def _count_large_prompt(self, conversation: object) -> int:
        """The tokens of a long conversation's texts (before control tokens are broken up,
        which only adds tokens), counted with the engine's second tokenizer under its own
        lock: only long prompts wait for each other, never the calls that share the
        engine's tokenizer."""
        from pj_core.prompts import normalize_conversation

        texts = [turn["content"] for turn in normalize_conversation(conversation)]  # type: ignore[arg-type]
        with self._large_prompt_lock:
            encoded = self._large_prompt_tokenizer(texts, add_special_tokens=False)["input_ids"]
        return sum(len(ids) for ids in encoded)

    def render_neutral_prompt(
        self, conversation: str | Sequence[dict[str, str]], neutral_system: str | None = None
    ) -> list[int]:
        """The neutral row's prompt: the conversation with no persona text (or with
        ``neutral_system`` as its system text), rendered as :meth:`render_prompts` renders a
        persona's. Used when ``strength > 0`` (:mod:`pj_core.decoding.guidance`).

        Example:
            >>> ids = pj.render_neutral_prompt("Hi!")  # doctest: +SKIP
        """
        from pj_core.prompts import check_unicode, render_ids

        if neutral_system is not None and not isinstance(neutral_system, str):
            raise InvalidPromptError(
                f"neutral_system must be a string or None, got {type(neutral_system).__name__}"
            )
        if neutral_system:
            check_unicode(neutral_system, "neutral_system")
        self.check_prompt_size(conversation, len(neutral_system or ""))
        with self._tokenizer_lock:
            return render_ids(self.tokenizer, conversation, neutral_system or None)

    def generate_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        persona_names: Sequence[str] | None = None,
        logit_transforms: Sequence[TransformFactory] = (),
        neutral_prompt_ids: Sequence[int] | None = None,
        response_format: ResponseFormat | None = None,
        **settings: Any,
    ) -> GenerationResult:
        """Persona-judge decoding from already rendered prompts, one token-id list per persona.

        ``settings`` are those of :meth:`generate` (lookahead, alternate, strategy, ...). Use
        this for prompt formats the prompt builder does not know. ``logit_transforms`` are
        factories of :class:`pj_core.decoding.logits.LogitTransform`, each called once for this
        call; the transforms change p and q alike before temperature, top-k and top-p. With
        ``strength > 0`` give ``neutral_prompt_ids``, the conversation rendered with no persona
        text (:mod:`pj_core.decoding.guidance`); without it, an unset strength means 0 (the default
        strength needs the neutral row).

        Example:
            >>> pj.generate_from_ids([[1, 5, 9], [1, 6, 9]], max_new_tokens=8)  # doctest: +SKIP
        """
        return final_result(
            self.stream_from_ids(
                prompt_ids,
                persona_names=persona_names,
                logit_transforms=logit_transforms,
                neutral_prompt_ids=neutral_prompt_ids,
                response_format=response_format,
                **settings,
            )
        )

    def stream_from_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        persona_names: Sequence[str] | None = None,
        logit_transforms: Sequence[TransformFactory] = (),
        neutral_prompt_ids: Sequence[int] | None = None,
        response_format: ResponseFormat | None = None,
        **settings: Any,
    ) -> Iterator[StreamEvent]:
        """The streaming form of :meth:`generate_from_ids`."""
        unknown = sorted(set(settings) - SETTING_NAMES)
        if unknown:
            raise InvalidGenerationConfigError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}; the settings are "
                f"{', '.join(sorted(SETTING_NAMES))}"
            )
        if settings.get("strength") is None and neutral_prompt_ids is None:
            # The default strength needs a neutral row, which only a conversation can give:
            # from bare ids with no neutral prompt, leaving strength unset means 0.
            settings = {**settings, "strength": 0.0}
        config = GenerationConfig.create(**settings, defaults=self.defaults)
        constraint = self.compile_constraint(response_format)
        prompts = self._checked_prompt_ids(prompt_ids)
        names = (
            [str(n) for n in persona_names]
            if persona_names is not None
            else [f"persona {i}" for i in range(len(prompts))]
        )
        if len(names) != len(prompts):
            raise InvalidPromptError(
                f"persona_names has {len(names)} names for {len(prompts)} prompts; give one each"
            )
        neutral = (
            self._checked_row("neutral_prompt_ids", neutral_prompt_ids)
            if neutral_prompt_ids is not None
            else None
        )
        return self.stream_prepared(
            prompts,
            names,
            config,
            logit_transforms=logit_transforms,
            neutral_prompt=neutral,
            constraint=constraint,
        )

    @overload
    def generate_batch(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        return_exceptions: Literal[False] = False,
    ) -> list[GenerationResult]: ...

    @overload
    def generate_batch(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        return_exceptions: Literal[True],
    ) -> list[GenerationResult | PersonaJudgeError]: ...

    def generate_batch(
        self,
        requests: Sequence[BatchRequest | Mapping[str, Any]],
        *,
        return_exceptions: bool = False,
    ) -> list[GenerationResult] | list[GenerationResult | PersonaJudgeError]:
        """Answer several requests (each with its own conversation, personas and settings) in
        one batched decode; see :func:`pj_core.batch.generate_batch`.

        Each result has the tokens of that request's own :meth:`generate` call with the same
        seed (up to rare floating-point differences between batched and single forwards).
        With ``return_exceptions=True`` a request's own error (it fails validation, or its
        transforms fail while decoding) comes back in its slot instead of being raised, and
        the other requests still get their answers.

        Example:
            >>> results = pj.generate_batch([  # doctest: +SKIP
            ...     {"conversation": "Hi!", "personas": ["Be funny.", "Be brief."], "seed": 1},
            ...     {"conversation": "Why?", "personas": ["Be kind.", "Be brief."], "seed": 2},
            ... ])
        """
        from pj_core.batch import generate_batch

        if return_exceptions:
            return generate_batch(self, requests, return_exceptions=True)
        return generate_batch(self, requests)

    def choose_strategy(self, *, n_personas: int, lookahead: int) -> StrategyName:
        """What ``strategy="auto"`` runs for this many personas and this lookahead.

        Times a few forwards of each kind on this model the first time (then remembers them)
        and compares the predicted cost per token, using the acceptance rate measured by this
        instance's earlier calls. See :mod:`pj_core.decoding.strategy_choice`.
        """
        key = (n_personas, lookahead)
        with self._auto_lock:
            timings = self._step_timings.get(key)
            alpha = self.acceptance_rate_estimate
        if timings is None:
            timings = self.backend.step_timings(n_personas=n_personas, lookahead=lookahead)
            with self._auto_lock:
                self._step_timings.setdefault(key, timings)
        return choose_strategy(timings, lookahead=lookahead, acceptance_rate=alpha)

    # ------------------------------------------------------------------------------ internals

    def _checked_prompt_ids(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        if not _is_list_like(prompt_ids) or len(prompt_ids) < 2:
            raise InvalidPromptError(
                "prompt_ids takes one token-id list per persona, two or more of them"
            )
        return [self._checked_row(f"prompt {i}", ids) for i, ids in enumerate(prompt_ids)]

    def _checked_row(self, label: str, ids: Sequence[int]) -> list[int]:
        """One prompt's token ids: a non-empty list of integers inside the vocabulary (Python
        or numpy integers; not floats, strings or bools, which would be truncated or read as
        ids silently)."""
        if not _is_list_like(ids):
            raise InvalidPromptError(
                f"{label} must be a list of token ids (ints), got {type(ids).__name__}"
            )
        row = []
        for position, token in enumerate(ids):
            if isinstance(token, torch.Tensor) and token.dim() == 0:
                token = token.item()
            try:
                if isinstance(token, bool):
                    raise TypeError
                row.append(operator.index(token))
            except TypeError:
                raise InvalidPromptError(
                    f"{label}: token {position} is {token!r} ({type(token).__name__}); token ids "
                    "are ints"
                ) from None
        if not row:
            raise InvalidPromptError(f"{label} is empty; every persona needs a prompt")
        bad = [t for t in row if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidPromptError(
                f"{label} has token ids outside the vocabulary "
                f"(0..{self.vocab_size - 1}): {bad[:5]}"
            )
        return row

    def stream_prepared(
        self,
        prompts: list[list[int]],
        names: list[str],
        config: GenerationConfig,
        *,
        emission_source: EmissionSource | None = None,
        logit_transforms: Sequence[TransformFactory] = (),
        neutral_prompt: list[int] | None = None,
        constraint: CompiledConstraint | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> Iterator[StreamEvent]:
        """The low-level entry every stream goes through: rendered ``prompts`` (from
        :meth:`render_prompts`), persona ``names`` and a validated :class:`GenerationConfig`.

        Checks what depends on the model (context window, roles), then returns the lazy event
        stream, as :meth:`stream` does.

        ``emission_source`` replaces the strategy's emission generator (same signature as
        :func:`pj_core.decoding.lockstep.lockstep_emissions`); :mod:`pj_core.batch` uses it to run
        many requests' lockstep rows in one shared batch. ``logit_transforms`` are called
        here, once each, to build this call's transforms (see :mod:`pj_core.decoding.logits`).
        ``neutral_prompt`` (from :meth:`render_neutral_prompt`) is required when
        ``config.strength > 0`` and ignored otherwise; the emission source then gets it as
        ``neutral=`` (an ``emission_source`` must accept that keyword to serve guided calls).
        ``constraint`` (from :meth:`compile_constraint`) adds a fresh matcher for this answer
        as the last transform, and the final result's ``parsed``; with ``tools`` (from
        :meth:`prepare_output`) the final result's ``tool_calls`` instead.
        """
        if self._model is not None:  # a cached model's files passed their full hash check
            check_verified(self._model)
        transforms = build_transforms(logit_transforms)
        if constraint is not None:  # last: no other transform may unmask a forbidden token
            transforms = (*transforms, ConstraintMask(constraint.matcher()))
        if config.strength > 0:
            if neutral_prompt is None:
                raise InvalidGenerationConfigError(
                    f"strength={config.strength} guides each persona against a neutral row, "
                    "so the call needs the neutral prompt: render it with "
                    "render_neutral_prompt(conversation), or pass neutral_prompt_ids to "
                    "generate_from_ids"
                )
            if not neutral_prompt:
                raise InvalidPromptError("the neutral prompt rendered to no tokens")
            # Guidance first: it acts on raw logits, before any other transform.
            transforms = (Strength(config.strength), *transforms)
        else:
            neutral_prompt = None
        if not config.alternate and len(prompts) != 2 and config.decoder == "persona-judge":
            raise InvalidGenerationConfigError(
                f"alternate=False (fixed roles: persona 0 drafts, persona 1 judges) needs exactly "
                f"two personas, got {len(prompts)}; pass alternate=True to let them take turns"
            )
        if any(not p for p in prompts):
            raise InvalidPromptError("a persona prompt rendered to no tokens")
        prompt_tokens = max(len(p) for p in [*prompts, neutral_prompt or []])
        if prompt_tokens + config.max_new_tokens > self.context_window:
            raise ContextOverflowError.over_budget(
                prompt_tokens, config.max_new_tokens, self.context_window
            )
        strategy: StrategyName
        if config.decoder == "pool":
            strategy = "lockstep"  # the pool steps every row together
        elif config.strategy == "auto":
            strategy = self.choose_strategy(n_personas=len(prompts), lookahead=config.lookahead)
        else:
            strategy = config.strategy
        return self._events(
            prompts,
            names,
            config,
            strategy,
            emission_source,
            transforms,
            neutral_prompt,
            constraint,
            tools,
        )

    def _events(
        self,
        prompts: list[list[int]],
        names: list[str],
        config: GenerationConfig,
        strategy: StrategyName,
        emission_source: EmissionSource | None = None,
        transforms: Sequence[LogitTransform] = (),
        neutral_prompt: list[int] | None = None,
        constraint: CompiledConstraint | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> Iterator[StreamEvent]:
        generator = torch.Generator(device="cpu")
        if config.seed is None:
            generator.seed()  # fresh entropy for this call only; the global RNG is untouched
        else:
            generator.manual_seed(config.seed)
        counters = Counters()
        run = emission_source or (
            pool_emissions
            if config.decoder == "pool"
            else speculative_emissions
            if strategy == "speculative"
            else lockstep_emissions
        )
        # The neutral row only reaches strategies that guide (batched rows do not yet).
        guided = {} if neutral_prompt is None else {"neutral": neutral_prompt}
        emissions = run(
            self.backend,
            prompts,
            config,
            eos_ids=self.eos_token_ids,
            generator=generator,
            counters=counters,
            pipeline=LogitPipeline(config, transforms),
            **guided,
        )
        decoder = IncrementalDecoder(self._decode)
        matcher = StopStringMatcher(config.stop)
        token_ids: list[int] = []
        trace: list[TokenTrace] = []
        finish: FinishReason = "length"
        model_seconds = 0.0
        try:
            while True:
                started = time.perf_counter()
                # inference_mode only around the model work: a generator that yields inside
                # the context would leak it into the caller's code between events.
                with torch.inference_mode():
                    emission = next(emissions, None)
                model_seconds += time.perf_counter() - started
                if emission is None:
                    break
                is_eos = emission.token_id in self.eos_token_ids
                piece = "" if is_eos else decoder.push(emission.token_id)
                entry = _trace_entry(emission, piece, names)
                token_ids.append(emission.token_id)
                trace.append(entry)
                yield StreamEvent(
                    text=matcher.push(piece), token_ids=[emission.token_id], trace=[entry]
                )
                if is_eos:
                    finish = "eos"
                    break
                if matcher.stopped:
                    finish = "stop"
                    break
        finally:
            emissions.close()
        stats = GenerationStats(
            tokens=len(token_ids),
            rounds=counters.rounds,
            drafted=counters.drafted,
            accepted=counters.accepted,
            resampled=counters.resampled,
            bonus=counters.bonus,
            forward_passes=counters.forward_passes,
            prefill_seconds=counters.prefill_seconds,
            decode_seconds=max(model_seconds - counters.prefill_seconds, 0.0),
            strategy=strategy,
        )
        self._update_acceptance_estimate(stats)
        tail = matcher.flush()
        result = GenerationResult(
            text=matcher.text,
            token_ids=token_ids,
            stats=stats,
            trace=trace,
            finish_reason=finish,
            prompt_tokens=max(len(p) for p in prompts),
            parsed=None if tools else _parsed(constraint, finish, matcher.text),
            tool_calls=_tool_calls(tools, finish, matcher.text),
        )
        yield StreamEvent(text=tail, done=True, result=result)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(
                self.tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
            )

    def _update_acceptance_estimate(self, stats: GenerationStats) -> None:
        if stats.drafted == 0:
            return
        with self._auto_lock:
            self.acceptance_rate_estimate += ACCEPTANCE_SMOOTHING * (
                stats.acceptance_rate - self.acceptance_rate_estimate
            )


LARGE_PROMPT_CHARS_PER_TOKEN = 4
"""A prompt with more characters than the context window times this is counted in tokens
before rendering (with a second tokenizer, see :meth:`PersonaJudge.check_prompt_size`), so
one that cannot fit is refused without holding the tokenizer lock that every call shares."""


class _RenderedCall(NamedTuple):
    """A call's rendered prompts and output rules (:meth:`PersonaJudge._render_call`)."""

    prompts: list[list[int]]
    names: list[str]
    neutral: list[int] | None
    constraint: CompiledConstraint | None
    tools: list[Tool] | None


def _is_list_like(value: object) -> bool:
    """A list, tuple, array or tensor (sized and iterable), not a string or a mapping."""
    if isinstance(value, str | bytes | Mapping):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() >= 1
    return hasattr(value, "__len__") and hasattr(value, "__iter__")


def _trace_entry(emission: Emission, piece: str, names: list[str]) -> TokenTrace:
    return TokenTrace(
        token_id=emission.token_id,
        text=piece,
        draft_persona=emission.roles.draft,
        draft_name=names[emission.roles.draft],
        judge_persona=emission.roles.judge,
        judge_name=names[emission.roles.judge],
        outcome=emission.outcome,
        round=emission.round,
    )


def _parsed(constraint: CompiledConstraint | None, finish: FinishReason, text: str) -> Any:
    """The answer as data when a constraint shaped it and the answer completed it (EOS);
    None otherwise (no constraint, or the budget or a stop string cut the answer)."""
    if constraint is None or finish != "eos":
        return None
    try:
        return constraint.parse(text)
    except ValueError:  # json/pydantic errors: a schema rule the grammar engine does not check
        return None


def _tool_calls(tools: Sequence[Tool] | None, finish: FinishReason, text: str) -> list[ToolCall]:
    """The answer's tool calls when it had tools and completed (EOS); else none."""
    if not tools or finish != "eos":
        return []
    return parse_tool_calls(text, tools)[1]
