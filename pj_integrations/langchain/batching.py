"""Many LangChain calls, one batched decode: the gather behind ``ChatPersonaJudge.batch``.

LangChain answers ``batch`` with one ``invoke`` per input, and ``invoke`` does everything a
call needs (input conversion, callbacks and their runs, cache, rate limiter, message ids)
before it reaches the model's ``_generate``. The chat model keeps all of that and changes
only where decoding happens: during a batch, each input's ``_generate`` hands its request to
a :class:`Gather` and waits; when no input of the batch is still on its way (each has either
handed its request over, or finished without one: a cache hit, an error, a streamed call),
one waiting thread decodes every request in ONE ``PersonaJudge.generate_batch`` and gives
each its own result or its own error.

Example:
    >>> gather = Gather(2)
    >>> gather.expected
    2
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig

from pj_core.calls import CallRequest, run_batch
from pj_core.results import GenerationResult

SlotState = Literal["running", "submitted", "done", "left"]


@dataclass(eq=False)
class Slot:
    """One input of a batch: its state and, once decoded, its outcome."""

    gather: Gather
    state: SlotState = "running"
    request: CallRequest | None = None
    outcome: GenerationResult | BaseException | None = field(default=None, repr=False)


_SLOT: contextvars.ContextVar[Slot | None] = contextvars.ContextVar("pj_batch_slot", default=None)


def current_slot() -> Slot | None:
    """The batch slot of the running call, or None outside a batch (or once it has left)."""
    slot = _SLOT.get()
    return slot if slot is not None and slot.state == "running" else None


class Gather:
    """A barrier that turns the ``_generate`` calls of one batch into one decode.

    ``expected`` inputs start in the state *running*. A running input either submits its
    request (:meth:`decode`, which blocks until its result is there) or leaves
    (:meth:`leave`: it finished, or decodes on its own). When no input is running and some
    wait, one waiting thread runs the decode for all of them.
    """

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self._running = expected
        self._waiting: list[Slot] = []
        self._decoding = False
        self._lock = threading.Condition()

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Enter one input's call: its ``_generate`` (in this context) will find the slot.
        Leaving the block leaves the gather, so an input that never submits cannot stall
        the others."""
        slot = Slot(self)
        token = _SLOT.set(slot)
        try:
            yield slot
        finally:
            _SLOT.reset(token)
            self.leave(slot)

    def leave(self, slot: Slot) -> None:
        """The input will not submit (it finished, or decodes on its own)."""
        with self._lock:
            if slot.state == "running":
                slot.state = "left"
                self._running -= 1
                self._lock.notify_all()

    def decode(self, slot: Slot, request: CallRequest) -> GenerationResult:
        """Submit ``request`` and wait for its result; raises the request's own error."""
        with self._lock:
            if slot.state != "running":
                raise RuntimeError(f"a batch slot in state {slot.state!r} submitted a request")
            slot.state, slot.request = "submitted", request
            self._running -= 1
            self._waiting.append(slot)
            self._lock.notify_all()
            while slot.state == "submitted":
                if self._running == 0 and self._waiting and not self._decoding:
                    batch, self._waiting, self._decoding = self._waiting, [], True
                    self._lock.release()
                    try:
                        _decode_all(batch)
                    finally:
                        self._lock.acquire()
                        self._decoding = False
                        self._lock.notify_all()
                else:
                    self._lock.wait()
        if isinstance(slot.outcome, BaseException):
            raise slot.outcome
        assert slot.outcome is not None
        return slot.outcome


def _decode_all(slots: list[Slot]) -> None:
    """One ``generate_batch`` per engine (one in all unless calls named other models);
    every slot gets its result or its error and is marked done."""
    groups: dict[int, list[Slot]] = {}
    for slot in slots:
        assert slot.request is not None
        groups.setdefault(id(slot.request.engine), []).append(slot)
    for group in groups.values():
        requests = [slot.request for slot in group if slot.request is not None]
        try:
            outcomes: list[GenerationResult | BaseException] = list(
                run_batch(requests[0].engine, [r.batch_request() for r in requests])
            )
        except BaseException as exc:  # a failure of the decode itself: every request failed
            outcomes = [exc] * len(group)
        for slot, outcome in zip(group, outcomes, strict=True):
            slot.outcome, slot.state = outcome, "done"


# ----------------------------------------------------------------------------- batch drivers

Invoke = Callable[..., Any]
"""A model's ``invoke`` (or ``ainvoke``): ``(input, config, **kwargs)``."""
CheckInput = Callable[[Any, RunnableConfig, dict[str, Any]], None]
"""Raises what a call with this input, config and keyword arguments would raise before
decoding; returns nothing otherwise."""


def batch_invokes(
    invoke: Invoke,
    check: CheckInput,
    inputs: Sequence[Any],
    configs: list[RunnableConfig],
    kwargs: dict[str, Any],
    *,
    return_exceptions: bool,
) -> list[Any]:
    """``invoke`` for every input, each in its own thread and :meth:`Gather.slot`, so their
    decodes meet in one ``generate_batch`` (``max_concurrency`` inputs at a time).

    Without ``return_exceptions`` an input that ``check`` rejects is raised by invoking it
    alone (its own callback run) before anything is decoded, and otherwise the first
    error in input order is raised after the batch."""
    if not inputs:
        return []
    if not return_exceptions:
        invalid = _first_invalid(check, inputs, configs, kwargs)
        if invalid is not None:
            invoke(inputs[invalid], configs[invalid], **kwargs)
    outcomes: list[Any] = []
    for chunk in _chunks_of(configs):
        gather = Gather(len(chunk))

        def one(index: int, gather: Gather = gather) -> Any:
            with gather.slot():
                try:
                    return invoke(inputs[index], configs[index], **kwargs)
                except Exception as exc:
                    return exc

        with ThreadPoolExecutor(max_workers=len(chunk)) as pool:
            futures = [pool.submit(contextvars.copy_context().run, one, i) for i in chunk]
            outcomes += [future.result() for future in futures]
    return _outcomes(outcomes, return_exceptions)


async def abatch_invokes(
    ainvoke: Invoke,
    check: CheckInput,
    inputs: Sequence[Any],
    configs: list[RunnableConfig],
    kwargs: dict[str, Any],
    *,
    return_exceptions: bool,
) -> list[Any]:
    """:func:`batch_invokes` with ``ainvoke``: the inputs run as tasks on the event loop,
    their decodes (in worker threads) meet in one ``generate_batch``."""
    if not inputs:
        return []
    if not return_exceptions:
        invalid = await asyncio.to_thread(_first_invalid, check, inputs, configs, kwargs)
        if invalid is not None:
            await ainvoke(inputs[invalid], configs[invalid], **kwargs)
    outcomes: list[Any] = []
    for chunk in _chunks_of(configs):
        gather = Gather(len(chunk))

        async def one(index: int, gather: Gather = gather) -> Any:
            with gather.slot():
                try:
                    return await ainvoke(inputs[index], configs[index], **kwargs)
                except Exception as exc:
                    return exc

        outcomes += await asyncio.gather(*(one(i) for i in chunk))
    return _outcomes(outcomes, return_exceptions)


def _first_invalid(
    check: CheckInput,
    inputs: Sequence[Any],
    configs: list[RunnableConfig],
    kwargs: dict[str, Any],
) -> int | None:
    for index, (input_, config) in enumerate(zip(inputs, configs, strict=True)):
        try:
            check(input_, config, kwargs)
        except Exception:
            return index
    return None


def _chunks_of(configs: list[RunnableConfig]) -> list[range]:
    """Input index ranges decoded together: all, or ``max_concurrency`` at a time."""
    size = configs[0].get("max_concurrency") or len(configs)
    return [range(start, min(start + size, len(configs))) for start in range(0, len(configs), size)]


def _outcomes(outcomes: list[Any], return_exceptions: bool) -> list[Any]:
    """The batch's answers; without ``return_exceptions`` the first error is raised."""
    if not return_exceptions:
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
    return outcomes
