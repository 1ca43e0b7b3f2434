#!/usr/bin/env bash
# Every table of docs/benchmarks.md in one sitting: each sub-command's printed table goes to
# OUT/SUBCOMMAND.txt and its numbers to OUT/SUBCOMMAND.json. Run from the repository root on an
# otherwise idle machine:  bash benchmarks/run_all.sh [OUT]   (default work_dirs/benchmarks)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-work_dirs/benchmarks}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
lscpu | grep -E 'Model name|^CPU\(s\)|Flags' > "$OUT/cpu.txt"
for cmd in flops attention attention-cpu-bf16 backbone detector train-step engines; do
    echo "[run_all] $cmd -> $OUT/$cmd.txt" >&2
    start=$(date +%s)
    "$PY" -m benchmarks "$cmd" --json "$OUT/$cmd.json" | tee "$OUT/$cmd.txt"
    echo "[run_all] $cmd took $(( $(date +%s) - start )) s" >&2
done
