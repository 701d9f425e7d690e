"""bench/placement.py --quick --no-calibrate: the simulation's results, on seeded traffic, into a temp dir."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"policy", "adapters", "replicas", "slots", "zipf", "arrival_rate_per_s", "requests_measured",
          "seconds_measured", "loads_per_s", "loads_per_replica_s", "disk_loads_per_s", "loads_per_1k_requests",
          "queue_p50_s", "queue_p99_s", "queue_mean_s", "slot_util", "replica_util", "replica_util_max", "row_util"}


def _run(out: Path) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "placement.py"), "--quick", "--no-calibrate", "--out",
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "recommendation" in r.stdout and "affinity_hrw" in r.stdout
    return json.loads((out / "placement.json").read_text())


def test_placement_quick_is_deterministic_and_affinity_loads_less(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    assert a["rows"] == b["rows"] and a["recommendation"] == b["recommendation"]  # same seed, same numbers
    assert (tmp_path / "a" / "placement.png").stat().st_size > 10_000
    for key in ("grid", "params", "profile", "calibration", "cpu", "rows", "recommendation"):
        assert key in a
    assert {"model_name", "torch_cpu_capability"} <= set(a["cpu"])
    assert {"t_disk_s", "t_host_s", "step_base_s", "step_per_row_s", "prefill_per_token_s"} <= set(a["calibration"])
    grid = a["grid"]
    assert len(a["rows"]) == (len(grid["adapters"]) * len(grid["replicas"]) * len(grid["slots"]) * len(grid["zipf"])
                              * len(a["policies"]))
    by = {}
    for row in a["rows"]:
        assert FIELDS <= set(row)
        assert 0 <= row["slot_util"] <= 1 and 0 < row["replica_util"] <= row["replica_util_max"]
        assert row["queue_p50_s"] <= row["queue_p99_s"] and row["requests_measured"] > 100
        by[(row["policy"], row["replicas"], row["slots"])] = row
    for (pol, rep, k), row in by.items():
        if pol != "random":
            continue
        # on the same seeded traffic, both affinity policies load fewer adapters than random placement
        assert by[("affinity_hrw", rep, k)]["loads_per_s"] < row["loads_per_s"]
        assert by[("affinity_holder", rep, k)]["loads_per_s"] < row["loads_per_s"]
    # too few slots for the batch: requests wait for a slot (random placement, the same traffic)
    reps = sorted({r for _, r, _ in by})
    ks = sorted({k for _, _, k in by})
    for rep in reps:
        assert by[("random", rep, ks[-1])]["queue_p99_s"] < by[("random", rep, ks[0])]["queue_p99_s"]
    rec = a["recommendation"]
    assert rec["policy"] in a["policies"] and rec["rule"].startswith(f"use {rec['policy']}")
    assert {"min_slots", "bounds", "policy_scores"} <= set(rec)
