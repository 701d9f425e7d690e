"""Fixtures for the registry tests: random (untrained) LoRA adapters in real PEFT format on the tiny base."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemtune.registry.synthetic import make_random_adapters


@pytest.fixture(scope="module")
def adapters(tiny_gemma3, tmp_path_factory) -> list[Path]:
    """Three rank-8 adapters (different seeds); tests copy them before changing anything."""
    d = tmp_path_factory.mktemp("adapters")
    return make_random_adapters(tiny_gemma3, [d / "a", d / "b", d / "c"], r=8)


def add_verdict(adapter_dir: Path, *, passed: bool = True, baseline_id: str = "base:tiny",
                sha: str | None = None) -> dict:
    """Record an eval verdict (contract C1 shape) for the adapter's current weights (or `sha`), as `gemtune eval
    --record` does; for tests of the registry's reading side that need no model run."""
    from gemtune.adapter import read_sidecar, update_sidecar, weights_sha256

    v = {"adapter_sha256": sha or weights_sha256(adapter_dir), "suite_sha256": "0" * 64,
         "baseline": baseline_id, "baseline_id": baseline_id, "passed": passed,
         "regressed_share": 0.0 if passed else 0.25, "gate": 0.02, "accuracy": 0.9, "baseline_accuracy": 0.5,
         "cases": 8, "at": "2026-01-01T00:00:00Z", "forced": False}
    update_sidecar(adapter_dir, {"eval_verdicts": [*read_sidecar(adapter_dir).get("eval_verdicts", []), v]})
    return v


@pytest.fixture
def verdict():
    """`verdict(dir, passed=..., baseline_id=...)`: see add_verdict."""
    return add_verdict
