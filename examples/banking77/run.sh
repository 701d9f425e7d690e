#!/usr/bin/env bash
# banking77 end to end on this CPU: curate -> train -> frozen-eval accuracy vs the base. Prints minutes per stage.
#   ./run.sh [OUT]        (default OUT=/tmp/gemtune-banking77; set CASES=N to change the eval size, default 300)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DATASETS="${GEMTUNE_DATASETS:-$ROOT/../shared/datasets}"
OUT="${1:-/tmp/gemtune-banking77}"
CASES="${CASES:-300}"
GT="${GEMTUNE:-$ROOT/.venv/bin/gemtune}"
mkdir -p "$OUT"
stamp() { date +%s; }
t0=$(stamp)
"$GT" data build "$DATASETS/banking77/train.csv" --out "$OUT/data" --config "$HERE/gemtune.yaml" \
    --generic "$DATASETS/self-instruct/user_oriented_instructions.jsonl" --quiet
t1=$(stamp)
"$GT" train --data "$OUT/data" --out "$OUT/run" --config "$HERE/gemtune.yaml"
t2=$(stamp)
"$GT" eval --adapter "$OUT/run/adapter" --suite "$OUT/data" --out "$OUT/eval" --baseline base \
    --config "$HERE/gemtune.yaml" --max-cases "$CASES"
t3=$(stamp)
python3 - "$OUT" "$t0" "$t1" "$t2" "$t3" "$CASES" <<'PY'
import json, sys, pathlib
out, t0, t1, t2, t3, cases = sys.argv[1], *map(int, sys.argv[2:6]), int(sys.argv[6])
s = json.loads((pathlib.Path(out) / "eval" / "summary.json").read_text())
res = {"cases": cases, "adapter_accuracy": s.get("accuracy"),
       "base_accuracy": ((s.get("compare") or {}).get("accuracy") or {}).get("baseline"),
       "eval_line": s.get("line"),
       "minutes": {"data": round((t1 - t0) / 60, 1), "train": round((t2 - t1) / 60, 1), "eval": round((t3 - t2) / 60, 1)}}
(pathlib.Path(out) / "banking77.json").write_text(json.dumps(res, indent=2) + "\n")
print(json.dumps(res))
PY
