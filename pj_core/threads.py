"""Blocking iterators consumed from asyncio: the one sync-to-async bridge of the code base.

Decoding is blocking work on the CPU; the adapters' async methods and the HTTP server run it
in a worker thread and hand each item to the event loop, so the loop stays free while tokens
are decoded.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")

THREAD_NAME = "pj-astream"
"""Name of every worker thread :func:`iterate_in_thread` starts (to find them in a dump)."""


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a blocking iterator in a worker thread and yield its items without blocking the loop.

    The worker hands items over through an :class:`asyncio.Queue`. If the consumer stops
    early (``break``, ``aclose()``, cancellation), the worker stops at its next item and
    closes the iterator, so an abandoned stream does not keep decoding.

    Example:
        >>> async def demo() -> list[int]:
        ...     return [x async for x in iterate_in_thread(lambda: iter(range(3)))]
        >>> asyncio.run(demo())
        [0, 1, 2]
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Literal["item", "error", "end"], Any]] = asyncio.Queue()
    stopped = threading.Event()

    def hand_over(kind: Literal["item", "error", "end"], payload: Any) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def produce() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    if stopped.is_set() or not hand_over("item", item):
                        return
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, re-raised there
            hand_over("error", exc)
        else:
            hand_over("end", None)

    # A daemon thread, not the loop's default executor: asyncio.run() waits for executor
    # jobs at shutdown, and an abandoned stream must not hold the program open.
    context = contextvars.copy_context()  # keeps LlamaIndex's instrumentation span ids
    threading.Thread(target=context.run, args=(produce,), name=THREAD_NAME, daemon=True).start()
    try:
        while True:
            kind, payload = await queue.get()
            if kind == "item":
                yield payload
            elif kind == "error":
                raise payload
            else:
                return
    finally:
        stopped.set()
