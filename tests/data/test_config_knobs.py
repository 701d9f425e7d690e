"""`data:` knobs read through gemtune/config.py: the names pass (`pii_names`), the spaCy pipeline Presidio runs on
(`pii_spacy_model`, over $GEMTUNE_SPACY_MODEL), and advice warnings carried into the build report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gemtune.data.config import load_data_config
from gemtune.data.pipeline import build, make_redactor
from gemtune.errors import UserError

WORDS = ("card", "refund", "parcel", "login", "invoice", "transfer", "app", "fee", "pin", "address", "loan", "branch",
         "limit", "statement", "delivery", "password", "account", "charge", "email", "phone")
SIGNERS = ("Chen", "Fatima", "Luis", "Ingrid", "Kwame", "Sakura")


def _raw(path: Path, n: int = 40) -> Path:
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.sample(WORDS, 6))
            f.write(json.dumps({"input": f"ticket {i}: {words} problem, write to me at user{i}@example.org. "
                                         f"Regards, {SIGNERS[i % len(SIGNERS)]}",
                                "output": ["billing", "cards"][i % 2]}) + "\n")
    return path


def _yaml(tmp_path: Path, body: str) -> Path:
    y = tmp_path / "gemtune.yaml"
    y.write_text("data:\n  instruction: Route the ticket.\n" + body, encoding="utf-8")
    return y


def _texts(out: Path) -> str:
    return (out / "train.jsonl").read_text(encoding="utf-8") + (out / "eval.jsonl").read_text(encoding="utf-8")


def test_pii_names_false_keeps_names_and_still_redacts_structured_pii(tiny_gemma3, tmp_path):
    raw = _raw(tmp_path / "raw.jsonl")
    on = build([raw], tmp_path / "on", load_data_config(_yaml(tmp_path, ""), {"base": str(tiny_gemma3)}))
    assert on["pii"]["PERSON"] == 40 and on["pii_names"] is True
    assert "Regards, <PERSON>" in _texts(tmp_path / "on") and "Chen" not in _texts(tmp_path / "on")

    cfg = load_data_config(_yaml(tmp_path, "  pii_names: false\n"), {"base": str(tiny_gemma3)})
    assert cfg.pii_names is False
    off = build([raw], tmp_path / "off", cfg)
    text = _texts(tmp_path / "off")
    assert off["pii"].get("PERSON", 0) == 0 and off["pii"]["EMAIL"] == 40 and off["pii_names"] is False
    assert "Regards, Chen" in text and "<PERSON>" not in text and "@example.org" not in text
    assert json.loads((tmp_path / "off" / "dataset.json").read_text())["options"]["pii_names"] is False


def test_pii_names_must_be_a_boolean_with_file_line_and_field(tmp_path):
    y = _yaml(tmp_path, "  pii_names: sometimes\n")
    with pytest.raises(UserError) as e:
        load_data_config(y)
    assert str(e.value).startswith(f'{y}:3: field "data.pii_names": ') and "valid boolean" in str(e.value)


def _presidio_missing() -> str | None:
    try:
        import presidio_analyzer  # noqa: F401
    except ImportError as e:
        return f"presidio-analyzer is not installed ({e}); pip install 'gemtune[test]'"
    from gemtune.data.pii import installed_spacy_model

    return None if installed_spacy_model() else "no spaCy English pipeline is installed; pip install 'gemtune[test]'"


MISSING = _presidio_missing()


@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_pii_spacy_model_in_the_config_wins_over_the_environment(tmp_path, monkeypatch):
    from gemtune.data.pii import installed_spacy_model

    installed = installed_spacy_model()
    # the config names a pipeline that is not installed; the environment names one that is: the config is used
    monkeypatch.setenv("GEMTUNE_SPACY_MODEL", installed)
    cfg = load_data_config(_yaml(tmp_path, "  pii_engine: presidio\n  pii_spacy_model: en_core_web_nonexistent\n"))
    with pytest.raises(UserError) as e:
        make_redactor(cfg)
    assert str(e.value).startswith('field "pii_spacy_model": spaCy pipeline \'en_core_web_nonexistent\' is not '
                                   "installed")
    # and the other way round: the configured (installed) pipeline runs although the environment names a bad one
    monkeypatch.setenv("GEMTUNE_SPACY_MODEL", "en_core_web_nonexistent")
    cfg = load_data_config(_yaml(tmp_path, f"  pii_engine: presidio\n  pii_spacy_model: {installed}\n"))
    assert make_redactor(cfg).ner.model == installed
    # without the knob the environment variable still picks the pipeline
    cfg = load_data_config(_yaml(tmp_path, "  pii_engine: presidio\n"))
    with pytest.raises(UserError, match="'en_core_web_nonexistent' is not installed"):
        make_redactor(cfg)


def test_generic_fraction_outside_the_advice_warns_on_stderr_and_in_the_report(cli, tiny_gemma3, tmp_path, capsys):
    raw = _raw(tmp_path / "raw.jsonl")
    gen = tmp_path / "generic.jsonl"
    gen.write_text("".join(json.dumps({"instruction": f"Write a {k + 3}-line poem about {WORDS[k % 20]} number {k}",
                                       "output": f"poem {k}"}) + "\n" for k in range(30)), encoding="utf-8")
    y = _yaml(tmp_path, "  generic_fraction: 0.2\n")
    assert cli("data", "build", raw, "--out", tmp_path / "ds", "--base", tiny_gemma3, "--config", y,
               "--generic", gen, "-q") == 0
    err = capsys.readouterr().err
    assert f'{y}:3: field "data.generic_fraction": 0.2 is outside the advised 0.05–0.1' in err
    report = json.loads((tmp_path / "ds" / "report.json").read_text(encoding="utf-8"))
    advice = [w for w in report["warnings"] if "generic_fraction" in w]
    assert advice == ['field "data.generic_fraction": 0.2 is outside the advised 0.05–0.1 (a 5-10 % generic mix '
                      "keeps the base's general ability); going ahead as asked"]
    # a value inside the advice adds no warning
    ok = build([raw], tmp_path / "ok", load_data_config(y, {"base": str(tiny_gemma3), "generic_fraction": 0.07}))
    assert not [w for w in ok["warnings"] if "advised" in w]
