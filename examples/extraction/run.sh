#!/usr/bin/env bash
# Freight-message extraction end to end on this CPU: data build -> train -> eval vs the base (free and decoded
# under the schema) -> field-level F1 per key and the schema-valid rate. Prints minutes per stage.
#   ./run.sh [OUT]        (default OUT=/tmp/gemtune-extraction)
#   CASES=N    eval cases (default 120 of the frozen eval)      MAX_STEPS=N   override train.max_steps (smoke runs)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DATASETS="${GEMTUNE_DATASETS:-$ROOT/../shared/datasets}"
OUT="${1:-/tmp/gemtune-extraction}"
CASES="${CASES:-120}"
GT="${GEMTUNE:-$ROOT/.venv/bin/gemtune}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
mkdir -p "$OUT"
cd "$HERE"   # gemtune.yaml names schema.json relative to here
stamp() { date +%s; }
t0=$(stamp)
"$PY" make_data.py --out "$OUT/shipments.jsonl" --schema "$OUT/schema.json" >/dev/null
cmp -s "$OUT/shipments.jsonl" shipments.jsonl || { echo "make_data.py no longer reproduces shipments.jsonl" >&2; exit 1; }
"$GT" data build shipments.jsonl --out "$OUT/data" --config gemtune.yaml \
    --generic "$DATASETS/self-instruct/user_oriented_instructions.jsonl" --quiet
t1=$(stamp)
"$GT" train --data "$OUT/data" --out "$OUT/run" --config gemtune.yaml ${MAX_STEPS:+--max-steps "$MAX_STEPS"}
t2=$(stamp)
rc=0
"$GT" eval --adapter "$OUT/run/adapter" --suite "$OUT/data" --out "$OUT/eval" --baseline base \
    --config gemtune.yaml --max-cases "$CASES" || rc=$?
[ "$rc" -le 1 ] || exit "$rc"   # 1 = the gate said no: still print the figures
t3=$(stamp)
"$PY" summarise.py "$OUT" "$t0" "$t1" "$t2" "$t3"
