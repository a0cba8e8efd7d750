#!/usr/bin/env bash
# The documented separation runs (docs/evaluation.md), one at a time: each is under 40 minutes
# on a 2-core CPU. Every run has fixed seeds, so rerunning a line reproduces its table. The
# "sweep" runs are those that chose the shipped defaults (persona strength, composition mode,
# decoder; issue 25).
#
#   bash benchmarks/separation_runs.sh            # all runs
#   bash benchmarks/separation_runs.sh smollm2    # only the runs whose name starts with "smollm2"
#
# Needs ../shared/data/koala_dev.jsonl (the development prompts) for the koala-dev runs; the
# "sample" runs use the Koala sample shipped in pj_core/data.
set -euo pipefail
cd "$(dirname "$0")/.."
PJ="${PJ:-.venv/bin/pj}"
ONLY="${1:-}"
DEV=../shared/data/koala_dev.jsonl

run() {
  local name="$1"
  shift
  if [[ -n "$ONLY" && "$name" != "$ONLY"* ]]; then
    return
  fi
  echo "== $name"
  time timeout 2700 "$PJ" eval separation "$@" --threads 2 --out "docs/separation-runs/$name"
}

run smollm2-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96
# The paper's composition modes on Gemma (its default row, recorded before the defaults
# changed, was the same computation as pj:one-per-preference and has been dropped).
run gemma3-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96 --generator gemma3-270m \
  --methods direct,pj:round-robin,pj:one-per-preference,pj:full
# The shipped defaults on Gemma.
run gemma3-defaults-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96 \
  --generator gemma3-270m --methods direct,default
run smollm2-koala-sample --prompts sample --limit 12 --max-new-tokens 96
run gemma3-koala-sample --prompts sample --limit 12 --max-new-tokens 96 --generator gemma3-270m

# The sweep (SmolLM2): strength 1 and 2 for Persona-judge over full prefixes and for the pool.
run sweep1-smollm2-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96 \
  --methods direct,direct@1,pj:one-per-preference@1,pj:full@1,pj:full@2,pool@2,pool:full@1,pool:full@2
# Round 2: the pool over one prefix per preference (what personas=[catalog names] gives) at
# other strengths, and over two round-robin prefixes.
run sweep2-smollm2-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96 \
  --methods direct,pool@1,pool@1.5,pool@3,pool:round-robin@2
# Round 3: guidance can cost correctness (SmolLM2 answered "What is the capital of France?"
# with Paris 2 times in 6 at strength 1.5, 6 in 6 at strength 0), so the pool unguided and
# lightly guided.
run sweep3-smollm2-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96 \
  --methods direct,pool@0,pool@0.5
