#!/usr/bin/env bash
# The documented separation runs (docs/evaluation.md), one at a time: each is under 40 minutes
# on a 2-core CPU. Every run has fixed seeds, so rerunning a line reproduces its table.
#
#   bash benchmarks/separation_runs.sh            # all runs
#   bash benchmarks/separation_runs.sh smollm2    # only the runs whose name contains "smollm2"
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
  if [[ -n "$ONLY" && "$name" != *"$ONLY"* ]]; then
    return
  fi
  echo "== $name"
  time timeout 2700 "$PJ" eval separation "$@" --threads 2 --out "docs/separation-runs/$name"
}

run smollm2-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96
run gemma3-koala-dev --prompts "$DEV" --limit 12 --max-new-tokens 96 --generator gemma3-270m
run smollm2-koala-sample --prompts sample --limit 12 --max-new-tokens 96
run gemma3-koala-sample --prompts sample --limit 12 --max-new-tokens 96 --generator gemma3-270m
