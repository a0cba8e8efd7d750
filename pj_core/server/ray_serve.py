"""``pj serve --ray``: the server as a Ray Serve deployment of N replicas.

Each replica is a process of its own that loads the model once and serves the same FastAPI
application as ``pj serve`` (:func:`pj_core.server.create_app`, with its continuous batching,
profiles and API keys). Ray Serve's HTTP proxy spreads requests over the replicas, replaces a
replica that dies, and places replicas on every machine of a Ray cluster. The replicas share
users' profiles through the store: give ``--store postgresql://...`` (a SQLite file is one
machine's; it serves replicas on one machine only).

Every response carries ``x-pj-replica: <host>:<pid>``, the replica that answered.

Example (a local Ray cluster is started when none is running)::

    pj serve --ray --replicas 2 --store postgresql://pj@db/profiles --port 8000

or from Python, e.g. inside an existing Ray application::

    from ray import serve
    from pj_core.server import ServerConfig
    from pj_core.server.ray_serve import deployment

    serve.run(deployment(ServerConfig(profile_store="postgresql://pj@db/profiles"),
                         replicas=2), name="persona-judge", route_prefix="/")

Install: ``pip install 'persona-judge[ray]'``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from pj_core.errors import InvalidGenerationConfigError
from pj_core.personas.store import AbstractProfileStore, is_url
from pj_core.server.app import ServerConfig, create_app

if TYPE_CHECKING:
    from fastapi import FastAPI

INSTALL_COMMAND = "pip install 'persona-judge[ray]'"
APP_NAME = "persona-judge"
"""The Ray Serve application's name."""
REPLICA_HEADER = "x-pj-replica"
"""The response header naming the replica that answered (``<host>:<pid>``)."""

LOG = logging.getLogger("pj_core.server")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def ray_modules() -> tuple[ModuleType, ModuleType]:
    """``ray`` and ``ray.serve``; :class:`InvalidGenerationConfigError` with the install
    command when Ray Serve is not installed."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise InvalidGenerationConfigError(
            f"pj serve --ray needs Ray Serve ({exc.name} is missing): {INSTALL_COMMAND}"
        ) from exc
    return ray, serve


class ReplicaHeader:
    """ASGI middleware: every HTTP response names the replica that answered."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], name: str) -> None:
        self.app = app
        self.value = name.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((REPLICA_HEADER.encode(), self.value))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, named)


def replica_name() -> str:
    """This process's replica name: ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def replica_app(config: ServerConfig) -> FastAPI:
    """What one replica serves: :func:`create_app` with the :data:`REPLICA_HEADER`."""
    app = create_app(config)
    app.add_middleware(ReplicaHeader, name=replica_name())
    return app


def check_config(config: ServerConfig, replicas: int) -> None:
    """What a deployment needs of ``config``: settings that can travel to other processes.

    Raises:
        InvalidGenerationConfigError: a ready engine or an open store object (each replica
            loads the model and opens the store itself), or fewer than one replica.
    """
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise InvalidGenerationConfigError(f"replicas must be an integer >= 1, got {replicas!r}")
    if config.engine is not None:
        raise InvalidGenerationConfigError(
            "a Ray deployment loads the model in each replica: give ServerConfig(model=...) "
            "(an alias or path), not engine="
        )
    if isinstance(config.profile_store, AbstractProfileStore):
        raise InvalidGenerationConfigError(
            "a Ray deployment opens the profile store in each replica: give "
            "ServerConfig(profile_store=...) as a postgresql:// URL (or a path), not a store "
            "object"
        )


def deployment(
    config: ServerConfig,
    *,
    replicas: int = 2,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int = 64,
) -> Any:
    """The Ray Serve application of ``replicas`` replicas serving ``config`` (bound, ready for
    ``serve.run``). Each replica loads the model once, opens the store itself, and gets
    ``num_cpus`` CPUs (Ray sets its torch threads to match) and ``num_gpus`` GPUs (a replica
    that sees a GPU loads the model on it).

    Raises:
        InvalidGenerationConfigError: see :func:`check_config`; Ray Serve not installed.
    """
    check_config(config, replicas)
    store = config.profile_store
    if replicas > 1 and not (isinstance(store, str) and is_url(store)):
        LOG.warning(
            "%d replicas share a SQLite profile store: that works on one machine only; give "
            "--store postgresql://... for replicas on several machines",
            replicas,
        )
    _, serve = ray_modules()

    @serve.deployment(
        name=APP_NAME,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )
    @serve.ingress()
    class PersonaJudgeReplica:
        """One replica: the model loaded once, the FastAPI application built on it."""

        def __init__(self, config: ServerConfig) -> None:
            self.served = replica_app(config)

        def __serve_build_asgi_app__(self) -> FastAPI:
            return self.served

    return cast(Any, PersonaJudgeReplica).bind(config)


def run(
    config: ServerConfig,
    *,
    replicas: int,
    host: str,
    port: int,
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> None:
    """Serve ``config`` with ``replicas`` replicas on ``host:port`` until interrupted.

    ``address`` is a running Ray cluster (``ray start --head`` prints it; default:
    ``$RAY_ADDRESS``, else a local cluster started here and stopped on exit).
    """
    check_config(config, replicas)
    ray, serve = ray_modules()
    config = replace(config, started=time.time())
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target)
    else:  # a local cluster for this command only
        ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            deployment(config, replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus),
            name=APP_NAME,
            route_prefix="/",
        )
        LOG.warning("pj serve --ray: %d replica(s) ready on http://%s:%d/v1", replicas, host, port)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
