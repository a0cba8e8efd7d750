"""Speed and memory benchmarks of persona-judge (issue 7).

Run them with ``pj bench`` (see ``docs/benchmarks.md``). The modules:

* ``bench_config``: what a run measures (methods, lookaheads, token budgets, prompts, repeats);
* ``memory``: peak resident memory per measured cell (and GPU memory on CUDA);
* ``reference_loop``: the baseline with the authors' cost profile (no KV cache, full
  recompute per step, two copies of the weights);
* ``methods``: one timed generation per method;
* ``worker``: one method in a fresh interpreter, so memory peaks do not mix;
* ``runner``: the orchestration (side-by-side rounds, medians, target checks);
* ``report``: JSON, Markdown table and PNG plots;
* ``batch_speed``: ``generate_batch`` against the same requests run one after another.
"""
