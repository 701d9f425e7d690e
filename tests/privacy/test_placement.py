"""`privacy.device` / `privacy.dtype`: checked like every stage's, honoured by the probe, recorded in its report."""

import pytest
import torch

from gemtune.errors import UserError
from gemtune.privacy.config import PrivacyConfig, load_privacy_config
from gemtune.privacy.probe import run_probe


@pytest.fixture(autouse=True)
def cpu_host(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_options_are_checked_with_their_yaml_line(tmp_path):
    assert PrivacyConfig().device == "auto" and PrivacyConfig().dtype == "auto"
    assert PrivacyConfig(dtype="fp32").dtype == "float32"
    y = tmp_path / "gemtune.yaml"
    y.write_text("privacy:\n  samples: 4\n  dtype: half\n")
    with pytest.raises(UserError, match=r'gemtune.yaml:3: field "privacy.dtype".*fp16 overflows'):
        load_privacy_config(y)
    y.write_text("privacy:\n  device: gpu0\n")
    with pytest.raises(UserError, match=r'gemtune.yaml:2: field "privacy.device".*unknown device'):
        load_privacy_config(y)


def test_probe_runs_where_configured_and_says_so(tiny_gemma3, tmp_path, make_zero_adapter, dataset_writer):
    data, canaries, _, _ = dataset_writer(tmp_path, copies=2)
    adapter = make_zero_adapter(tiny_gemma3, tmp_path / "adapter", data)
    small = dict(samples=2, candidates=8, pii_samples=2, pii_max_new_tokens=4)
    said = []
    rep = run_probe(adapter, None, tmp_path / "p.json", canaries=canaries, progress=said.append,
                    config=PrivacyConfig(dtype="bfloat16", **small))
    assert rep["placement"]["device"] == "cpu" and rep["placement"]["dtype"] == "bfloat16"
    assert rep["placement"]["requested"] == {"device": "auto", "dtype": "bfloat16"}
    assert any("(cpu, bfloat16)" in s for s in said)
    assert rep["extraction"]["adapter"] == rep["extraction"]["base"]  # B = 0, in bf16 too
    with pytest.raises(UserError, match=r'field "device".*CUDA is not available'):
        run_probe(adapter, None, tmp_path / "q.json", canaries=canaries, config=PrivacyConfig(device="cuda", **small))
    assert not (tmp_path / "q.json").exists()
