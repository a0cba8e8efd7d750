"""Blocking iterators consumed from asyncio: the one sync-to-async bridge of the code base.

Decoding is blocking work on the CPU; the adapters' async methods and the HTTP server run it
in a worker thread and hand each item to the event loop, so the loop stays free while tokens
are decoded. A consumer that leaves (``break``, ``aclose()``, a cancelled task, a timeout)
stops its worker at the worker's next item: an abandoned stream or a cancelled call stops
decoding within one token (one round of the speculative strategy).

At interpreter exit, the workers still running are told to stop and are waited for (each
finishes the forward it is in): a daemon thread killed inside a torch kernel at exit aborts
the whole process ("terminate called without an active exception").
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any, Literal, TypeVar

T = TypeVar("T")

THREAD_NAME = "pj-astream"
"""Name of every worker thread :func:`iterate_in_thread` starts (to find them in a dump)."""

EXIT_WAIT_SECONDS = 60.0
"""How long interpreter exit waits for the running workers, in all (a forward, a prefill)."""

_running: dict[threading.Thread, threading.Event] = {}  # worker -> its stop flag
_running_lock = threading.Lock()


@atexit.register
def _stop_workers_at_exit() -> None:
    """Tell every running worker to stop, and wait for it to leave torch (see the module)."""
    with _running_lock:
        workers = list(_running.items())
    for _, stopped in workers:
        stopped.set()
    for thread, _ in workers:
        thread.join(EXIT_WAIT_SECONDS / max(len(workers), 1))


async def last_in_thread(make_iterator: Callable[[], Iterator[T]]) -> T:
    """Run a blocking iterator to its end in a worker thread and return its last item.

    Cancelling the awaiting task (``asyncio.wait_for``, a client that left) stops the worker
    at its next item: a cancelled call stops decoding instead of running to its end.

    Raises:
        ValueError: the iterator yielded nothing.

    Example:
        >>> asyncio.run(last_in_thread(lambda: iter([1, 2, 3])))
        3
    """
    items = iterate_in_thread(make_iterator)
    try:
        last: list[T] = []
        async for item in items:
            last[:] = [item]
    finally:
        await items.aclose()
    if not last:
        raise ValueError("the iterator yielded nothing")
    return last[0]


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
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
            if stopped.is_set():  # the consumer left before the worker started
                return
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
        finally:
            with _running_lock:
                _running.pop(threading.current_thread(), None)

    # A daemon thread, not the loop's default executor: asyncio.run() waits for executor
    # jobs at shutdown, and an abandoned stream must not hold the program open.
    context = contextvars.copy_context()  # keeps LlamaIndex's instrumentation span ids
    worker = threading.Thread(target=context.run, args=(produce,), name=THREAD_NAME, daemon=True)
    with _running_lock:
        _running[worker] = stopped
    worker.start()
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
