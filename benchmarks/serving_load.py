"""Load on ``pj serve``: throughput and time to first token with 1, 4, 8 and 16 concurrent
streaming clients, against the same requests sent one after another; and the time to first
token of a request that arrives while 7 others are decoding, against an idle server.

The server is a real ``pj serve`` process on a loopback port (started and stopped here). Every
request streams (``stream=True``, ``include_usage``), personalised by two catalog preferences,
with a prompt from the development set (``../shared/data/koala_dev.jsonl``, else the shipped
Koala sample) and its own seed. Bounded: at most ``--requests-per-client`` requests per
client and ``--time-limit`` seconds in all.

Usage::

    python benchmarks/serving_load.py                    # SmolLM2, 48 tokens per answer
    python benchmarks/serving_load.py --concurrency 1 4 --tokens 32 --name quick

Writes ``benchmarks/results/<name>.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.prompt_source import load_prompts  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PREFERENCES = ["humor", "concise"]


@dataclass
class Timing:
    """One streamed request, times in seconds from its own start."""

    first_token: float
    total: float
    tokens: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(model: str, port: int, store: Path, batching: bool) -> subprocess.Popen[bytes]:
    """``pj serve`` on ``127.0.0.1:port``; returns once ``/health`` answers."""
    code = (
        "import sys, uvicorn; from pj_core.server import ServerConfig, create_app; "
        "app = create_app(ServerConfig(model=sys.argv[1], profile_store=sys.argv[3], "
        "preferences=['humor', 'concise'], batching=sys.argv[4] == '1')); "
        "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, model, str(port), str(store), "1" if batching else "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            raise SystemExit(f"pj serve exited:\n{err[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("pj serve did not start within 300 s")


def tagged(prompt: str, tag: str) -> str:
    """``prompt`` opened with a tag of its run. The server reuses the keys and values of
    prompt beginnings it has seen (prefix caching); without the tag, a prompt sent again in
    a later run would be reused whole, and that run would skip its prefill. Tagged, a run
    shares with earlier runs what different questions share: the persona's system turn."""
    return f"({tag}) {prompt}"


async def stream_one(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    prompt: str,
    seed: int,
    tokens: int,
    user: str | None = None,
) -> Timing:
    """One streamed completion (personalised by ``user``'s saved profile if given, else the
    server's preferences); the first token is the first chunk with text."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if user is not None:
        body["user"] = user
    started = time.perf_counter()
    first: float | None = None
    used = 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"request failed ({response.status_code}): {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise SystemExit(f"stream failed: {chunk['error']}")
            if chunk.get("usage"):
                used = int(chunk["usage"]["completion_tokens"])
            choices = chunk.get("choices") or []
            if first is None and choices and choices[0]["delta"].get("content"):
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return Timing(first_token=first if first is not None else total, total=total, tokens=used)


async def run_clients(
    url: str,
    model: str,
    prompts: list[str],
    clients: int,
    per_client: int,
    tokens: int,
    tag: str,
    users: list[str] | None = None,
) -> tuple[list[Timing], float]:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another
    (each prompt opened with ``tag``; client ``n`` as ``users[n % len(users)]`` if given);
    returns every request's timing and the wall time."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one_client(number: int) -> list[Timing]:
            done = []
            for k in range(per_client):
                index = number * per_client + k
                prompt = tagged(prompts[index % len(prompts)], tag)
                user = users[number % len(users)] if users else None
                done.append(await stream_one(client, url, model, prompt, index, tokens, user))
            return done

        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(n) for n in range(clients)))
        wall = time.perf_counter() - started
    return [t for per in results for t in per], wall


async def join_while_busy(
    url: str, model: str, prompts: list[str], busy: int, tokens: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Time to first token of one request on an idle server, and of the same request sent
    while ``busy`` others are decoding (each has streamed its first token)."""
    idle, loaded = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for repeat in range(repeats):
            probe = prompts[(busy + repeat) % len(prompts)]
            idle.append(
                (
                    await stream_one(
                        client, url, model, tagged(probe, f"idle {repeat}"), 999, tokens
                    )
                ).first_token
            )
            started: list[asyncio.Event] = [asyncio.Event() for _ in range(busy)]

            async def background(number: int, first: asyncio.Event, tag: str) -> None:
                body = {
                    "model": model,
                    "messages": [
                        {
                            "role": "user",
                            "content": tagged(prompts[number % len(prompts)], tag),
                        }
                    ],
                    "max_tokens": tokens * 4,
                    "seed": number,
                    "stream": True,
                }
                async with client.stream("POST", url, json=body) as response:
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        choices = json.loads(line[len("data: ") :]).get("choices") or []
                        if choices and choices[0]["delta"].get("content"):
                            first.set()

            tasks = [
                asyncio.create_task(background(n, started[n], f"background {repeat}"))
                for n in range(busy)
            ]
            await asyncio.gather(*(event.wait() for event in started))
            loaded.append(
                (
                    await stream_one(
                        client, url, model, tagged(probe, f"busy {repeat}"), 999, tokens
                    )
                ).first_token
            )
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return idle, loaded


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--busy", type=int, default=7, help="requests decoding when one joins")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=1800)
    parser.add_argument("--name", default="serving-load")
    args = parser.parse_args()
    prompts, source = load_prompts(max(args.concurrency) * args.requests_per_client + args.busy)
    port = _free_port()
    url, started = f"http://127.0.0.1:{port}/v1/chat/completions", time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pj-load-") as folder:
        server = start_server(args.model, port, Path(folder) / "profiles.db", batching=True)
        try:
            model = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
            asyncio.run(run_clients(url, model, prompts, 1, 1, 4, "warm-up"))
            for clients in args.concurrency:
                if time.monotonic() - started > args.time_limit:
                    print(f"time limit reached before {clients} clients", flush=True)
                    break
                count = clients * args.requests_per_client
                # The same requests one after another (one client), then concurrently.
                sequential, seq_wall = asyncio.run(
                    run_clients(url, model, prompts, 1, count, args.tokens, f"{clients} one by one")
                )
                concurrent, con_wall = asyncio.run(
                    run_clients(
                        url,
                        model,
                        prompts,
                        clients,
                        args.requests_per_client,
                        args.tokens,
                        f"{clients} concurrent",
                    )
                )
                row = {
                    "clients": clients,
                    "requests": count,
                    "sequential_tokens_per_s": sum(t.tokens for t in sequential) / seq_wall,
                    "concurrent_tokens_per_s": sum(t.tokens for t in concurrent) / con_wall,
                    "ttft_p50": percentile([t.first_token for t in concurrent], 0.5),
                    "ttft_p95": percentile([t.first_token for t in concurrent], 0.95),
                    "sequential_ttft_p50": percentile([t.first_token for t in sequential], 0.5),
                    "timings": [asdict(t) for t in concurrent],
                }
                row["speedup"] = row["concurrent_tokens_per_s"] / row["sequential_tokens_per_s"]
                rows.append(row)
                print(
                    f"{clients:2d} clients: {row['concurrent_tokens_per_s']:6.1f} tok/s vs "
                    f"sequential {row['sequential_tokens_per_s']:6.1f} ({row['speedup']:.2f}x); "
                    f"TTFT p50 {row['ttft_p50']:.2f} s, p95 {row['ttft_p95']:.2f} s",
                    flush=True,
                )
            idle, loaded = asyncio.run(
                join_while_busy(url, model, prompts, args.busy, args.tokens, args.repeats)
            )
        finally:
            server.kill()
            server.wait()
    join = {
        "busy": args.busy,
        "idle_ttft": statistics.median(idle),
        "busy_ttft": statistics.median(loaded),
        "ratio": statistics.median(loaded) / statistics.median(idle),
        "idle_samples": idle,
        "busy_samples": loaded,
    }
    print(
        f"joining while {args.busy} decode: TTFT {join['busy_ttft']:.2f} s vs idle "
        f"{join['idle_ttft']:.2f} s ({join['ratio']:.2f}x)",
        flush=True,
    )
    meta = {
        "command": "python benchmarks/serving_load.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "tokens": args.tokens,
        "requests_per_client": args.requests_per_client,
        "prompts": source,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
        "minutes": (time.monotonic() - started) / 60,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "join": join}, indent=1), encoding="utf-8"
    )
    lines = [
        "# pj serve under load",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {args.model}, {args.tokens} tokens per answer (fewer when EOS comes first), "
        f"{args.requests_per_client} requests per client; prompts from `{source}`  ",
        f"Machine: {meta['machine']}; load average after {meta['load_average']}",
        "",
        "| clients | requests | sequential tok/s | concurrent tok/s | speed-up | TTFT p50 | "
        "TTFT p95 | sequential TTFT p50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['requests']} | {row['sequential_tokens_per_s']:.1f} | "
            f"{row['concurrent_tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
            f"{row['ttft_p50']:.2f} s | {row['ttft_p95']:.2f} s | "
            f"{row['sequential_ttft_p50']:.2f} s |"
        )
    lines += [
        "",
        f"A request that arrives while {args.busy} others decode: time to first token "
        f"{join['busy_ttft']:.2f} s, against {join['idle_ttft']:.2f} s on an idle server "
        f"({join['ratio']:.2f}x; medians of {args.repeats}).",
        "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines), encoding="utf-8")
    _plot(rows, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.{{json,md,png}}")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    clients = [row["clients"] for row in rows]
    left.plot(clients, [r["concurrent_tokens_per_s"] for r in rows], "o-", label="concurrent")
    left.plot(clients, [r["sequential_tokens_per_s"] for r in rows], "s--", label="one by one")
    left.set_xlabel("clients")
    left.set_ylabel("tokens / s")
    left.set_title("throughput")
    left.legend()
    right.plot(clients, [r["ttft_p50"] for r in rows], "o-", label="p50")
    right.plot(clients, [r["ttft_p95"] for r in rows], "^-", label="p95")
    right.set_xlabel("clients")
    right.set_ylabel("seconds")
    right.set_title("time to first token")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
