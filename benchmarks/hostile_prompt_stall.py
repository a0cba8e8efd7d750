"""How long does a normal caller wait while another thread sends a hostile prompt?

A prompt of hundreds of kilobytes of control tokens (``<|im_start|>`` repeated) once took
~27 s to neutralise under the engine's tokenizer lock, and every other caller of the engine
waited for it. This script times a normal call (a short prompt, a few tokens) alone, then
while a second thread sends the hostile prompt over and over (``--pause`` seconds apart, as a
client would), and prints both (median and worst latency) with the hostile calls' own
durations and outcome. A hostile prompt just under the size bound (``--hostile-chars 600000``
for SmolLM2) is tokenized, in linear time, and refused by its token count.

    python -m benchmarks.hostile_prompt_stall --hostile-chars 800000 --calls 5

Run it from another checkout (``PYTHONPATH=<checkout>``) to compare versions on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from tqdm.auto import tqdm

PERSONAS = ["Answer concisely.", "Answer like an expert."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hostile-chars", type=int, default=800_000)
    parser.add_argument("--calls", type=int, default=5, help="normal calls per phase")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per normal call")
    parser.add_argument(
        "--pause",
        type=float,
        default=0.01,
        help="seconds between hostile calls (a client's round trip; with none, a thread that "
        "is refused at once spins and starves the others of Python's GIL instead)",
    )
    args = parser.parse_args()

    from pj_core.engine import PersonaJudge

    engine = PersonaJudge.from_pretrained(args.model)
    token = "<|im_start|>"
    hostile = token * (args.hostile_chars // len(token))

    def normal() -> float:
        start = time.perf_counter()
        engine.generate("Name a fruit.", PERSONAS, max_new_tokens=args.tokens, seed=0)
        return time.perf_counter() - start

    normal()  # warm-up: first-call costs are not the stall
    alone = [normal() for _ in tqdm(range(args.calls), desc="alone")]

    hostile_runs: list[tuple[float, str]] = []
    stop = threading.Event()

    def attacker() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                engine.generate(hostile, PERSONAS, max_new_tokens=1)
                outcome = "answered"
            except Exception as exc:  # the outcome is what we report
                outcome = type(exc).__name__
            hostile_runs.append((time.perf_counter() - start, outcome))
            time.sleep(args.pause)

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    time.sleep(0.2)  # let the first hostile call take the lock, if it can
    beside = [normal() for _ in tqdm(range(args.calls), desc="beside a hostile caller")]
    stop.set()
    thread.join()

    outcomes = sorted({outcome for _, outcome in hostile_runs})
    print(f"model {args.model}, hostile prompt {len(hostile)} characters, {args.calls} calls")
    print("| normal call | median s | worst s |")
    print("| --- | --- | --- |")
    print(f"| alone | {statistics.median(alone):.3f} | {max(alone):.3f} |")
    print(f"| beside a hostile caller | {statistics.median(beside):.3f} | {max(beside):.3f} |")
    durations = [seconds for seconds, _ in hostile_runs]
    print(
        f"hostile calls: {len(durations)}, median {statistics.median(durations):.3f} s, "
        f"outcome {', '.join(outcomes)}"
    )


if __name__ == "__main__":
    main()
