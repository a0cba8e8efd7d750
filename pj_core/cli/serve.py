"""``pj serve``: serve the model over OpenAI's chat-completions protocol.

Examples::

    pj serve                                   # SmolLM2 on http://127.0.0.1:8000/v1
    pj serve --port 9000 --store team.db       # profiles from team.db
    pj serve --store postgresql://pj@db/profiles   # profiles in PostgreSQL
    pj serve --ray --replicas 2 --store postgresql://pj@db/profiles   # Ray Serve replicas
    pj serve --preference humor --preference concise   # for requests that name no user

Then any OpenAI client: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``,
with ``user="alice"`` to personalise a request by alice's saved profile. See
docs/serving.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import TYPE_CHECKING

from pj_core.errors import InvalidGenerationConfigError

if TYPE_CHECKING:
    from pj_core.server.auth import KeyRing

LOOPBACK_NAMES = ("localhost",)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pj serve``."""
    from pj_core.cli.profiles import add_store_argument

    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible chat-completions API, personalised per user",
        description="Serve POST /v1/chat/completions, GET /v1/models and GET /health. A "
        "request's `user` selects the saved profile (see `pj profiles add`) that personalises "
        "the answer.",
    )
    parser.add_argument("--model", default=None, help="model spec (default smollm2-135m-instruct)")
    parser.add_argument(
        "--backend",
        default=None,
        help="transformers (default) or llama.cpp (the GGUF file as it is, quantised; "
        "needs llama-cpp-python)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the name clients send as `model` (default: the model's alias)",
    )
    parser.add_argument(
        "--preference",
        action="append",
        default=[],
        metavar="NAME_OR_TEXT",
        help="personalise requests that name no user with these preferences (repeatable); "
        "without it such a request is an error",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        metavar="N",
        help="largest request body accepted (default 4 MiB)",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=int,
        default=None,
        metavar="N",
        help="the most rows one batched step carries (a request brings one per persona, plus "
        "a neutral row when guided); more requests wait (default: no limit)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=None,
        metavar="N",
        help="the most requests waiting; more get a 429 with Retry-After (default: no limit)",
    )
    parser.add_argument(
        "--prefix-cache-tokens",
        type=int,
        default=None,
        metavar="N",
        help="prompt tokens kept for reuse by later prompts that begin the same way (a user's "
        "persona text, a chat's earlier turns); 0 turns it off (default: 4096, about 190 MB "
        "with SmolLM2)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop a request after this long, queue included (a 504; default: no limit)",
    )
    parser.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="the key file of `pj keys add` (default: $PJ_API_KEYS_FILE); keys in $PJ_API_KEYS "
        "(user_id=key,...; *=key for admin) count too. Without any key the server is open and "
        "listens on loopback only",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="serve with Ray Serve: --replicas processes, each loading the model once, behind "
        "Ray's proxy (a local Ray cluster unless --ray-address or $RAY_ADDRESS names one); "
        "give --store postgresql://... so replicas on several machines share profiles",
    )
    parser.add_argument(
        "--replicas", type=int, default=None, metavar="N", help="with --ray: replicas (default 2)"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="with --ray: a running Ray cluster (e.g. 10.0.0.5:6379 or auto)",
    )
    parser.add_argument(
        "--replica-cpus",
        type=float,
        default=None,
        metavar="N",
        help="with --ray: CPUs per replica (default 1; also its torch threads)",
    )
    parser.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        metavar="N",
        help="with --ray: GPUs per replica (default 0; a replica that sees a GPU loads the "
        "model on it)",
    )
    add_store_argument(parser)
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0"), is_loopback("localhost")
        (True, False, True)
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


OPEN_WARNING = (
    "pj serve: WARNING: no API keys are configured, so this server is OPEN: every local user "
    "and program can read, change and delete every profile and personalise as anyone. This is "
    "a development mode, on loopback only. Create keys with `pj keys add USER_ID --file "
    "keys.json` and start with --api-keys keys.json."
)


def api_keys(path: str | None) -> KeyRing:
    """The keys a server accepts: the key file (``path``, else ``$PJ_API_KEYS_FILE``) and
    ``$PJ_API_KEYS``.

    Raises:
        ApiKeyFileError: a missing or malformed key file or variable.
    """
    from pj_core.server.auth import KEYS_FILE_ENV_VAR, KeyRing

    file = path or os.environ.get(KEYS_FILE_ENV_VAR)
    from_file = KeyRing.from_file(file) if file else KeyRing()
    return from_file + KeyRing.from_env()


def check_host(host: str, *, keys: int) -> None:
    """Refuse to serve an open server (no keys) on anything but loopback.

    Raises:
        InvalidGenerationConfigError: no keys and a non-loopback ``host``.

    Example:
        >>> check_host("0.0.0.0", keys=2)  # with keys, any address
        >>> check_host("127.0.0.1", keys=0)
    """
    if not keys and not is_loopback(host):
        raise InvalidGenerationConfigError(
            f"--host {host} is not a loopback address: with no API keys the server is open to "
            "anyone who can reach it, so it listens on 127.0.0.1, ::1 or localhost only; give "
            "--api-keys FILE (see `pj keys add`) to serve on other addresses"
        )


def run(args: argparse.Namespace) -> int:
    """Load the model, open the store and serve until interrupted."""
    try:
        import uvicorn

        from pj_core.server import ServerConfig, create_app
        from pj_core.server.app import DEFAULT_MAX_BODY_BYTES
    except ImportError as exc:
        raise InvalidGenerationConfigError(
            f"pj serve needs the serve extra ({exc.name} is missing): "
            "pip install 'persona-judge[serve]'"
        ) from exc
    from pj_core.backends.hf.models import DEFAULT_MODEL

    keys = api_keys(args.api_keys)
    check_host(args.host, keys=len(keys))
    if not 0 <= args.port <= 65535:
        raise InvalidGenerationConfigError(f"--port {args.port} is not a port (0-65535)")
    limit = DEFAULT_MAX_BODY_BYTES if args.max_body_bytes is None else args.max_body_bytes
    if limit < 1024:
        raise InvalidGenerationConfigError(f"--max-body-bytes {limit} is too small (>= 1024)")
    ray_only = {
        "--replicas": args.replicas,
        "--ray-address": args.ray_address,
        "--replica-cpus": args.replica_cpus,
        "--replica-gpus": args.replica_gpus,
    }
    given = [flag for flag, value in ray_only.items() if value is not None]
    if given and not args.ray:
        raise InvalidGenerationConfigError(f"{', '.join(given)} need --ray")
    config = ServerConfig(
        model=args.model or DEFAULT_MODEL,
        backend=args.backend,
        served_model_name=args.served_model_name,
        profile_store=args.store,
        preferences=args.preference or None,
        max_body_bytes=limit,
        api_keys=keys,
        max_batch_rows=args.max_batch_rows,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        prefix_cache_tokens=args.prefix_cache_tokens,
    )
    if args.ray:
        from pj_core.server import ray_serve

        replicas = 2 if args.replicas is None else args.replicas
        cpus = 1.0 if args.replica_cpus is None else args.replica_cpus
        gpus = 0.0 if args.replica_gpus is None else args.replica_gpus
        if not cpus > 0 or not gpus >= 0:
            raise InvalidGenerationConfigError(
                f"--replica-cpus must be > 0 and --replica-gpus >= 0, got {cpus} and {gpus}"
            )
        print(
            f"pj serve: starting {replicas} Ray Serve replica(s) of {config.model} ...",
            file=sys.stderr,
            flush=True,
        )
        if not keys:
            print(OPEN_WARNING, file=sys.stderr, flush=True)
        ray_serve.run(
            config,
            replicas=replicas,
            host=args.host,
            port=args.port,
            address=args.ray_address,
            num_cpus=cpus,
            num_gpus=gpus,
        )
        return 0
    print(f"pj serve: loading {args.model or DEFAULT_MODEL} ...", file=sys.stderr, flush=True)
    app = create_app(config)
    where = f"http://{args.host}:{args.port}/v1"
    print(
        f"pj serve: {app.state.model_name} on {where} (profiles: {app.state.store.where}; "
        f"{len(keys)} API key(s))",
        file=sys.stderr,
        flush=True,
    )
    if not keys:
        print(OPEN_WARNING, file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
