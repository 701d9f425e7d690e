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
