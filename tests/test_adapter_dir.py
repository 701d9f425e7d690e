"""gemtune/adapter.py: the one owner of the adapter directory (sidecar sections, base, weights identity)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gemtune.adapter import (SIDECAR, base_named_in, base_of, check_adapter_dir, read_sidecar, update_sidecar,
                             weights_sha256, write_sidecar)
from gemtune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _adapter(d: Path, *, base_in_config: str | None = "peft/base", sidecar: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "base_model_name_or_path": base_in_config}))
    (d / "adapter_model.safetensors").write_bytes(b"weights-v1")
    if sidecar is not None:
        (d / SIDECAR).write_text(json.dumps(sidecar))
    return d


def test_update_by_section_keeps_the_other_sections(tmp_path):
    d = _adapter(tmp_path / "a", sidecar={"base_model": "b", "step": 60, "lora": {"r": 4}})
    update_sidecar(d, {"eval": {"accuracy": 0.9}, "shippable": True})
    side = update_sidecar(d, {"privacy": {"passed": False}})
    want = {"base_model": "b", "step": 60, "lora": {"r": 4}, "eval": {"accuracy": 0.9}, "shippable": True,
            "privacy": {"passed": False}}
    assert side == want and read_sidecar(d) == want
    update_sidecar(d, {"shippable": False})  # a section is replaced whole, the rest kept
    assert read_sidecar(d) == dict(want, shippable=False)
    assert sorted(p.name for p in d.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", SIDECAR]


def test_update_creates_a_missing_sidecar_and_refuses_a_broken_one(tmp_path):
    d = _adapter(tmp_path / "a")
    assert read_sidecar(d) == {}
    assert update_sidecar(d, {"privacy": {"passed": True}}) == {"privacy": {"passed": True}}
    (d / SIDECAR).write_text("{not json")
    with pytest.raises(UserError, match=rf"{SIDECAR}: not valid JSON"):
        update_sidecar(d, {"eval": {}})
    assert (d / SIDECAR).read_text() == "{not json"  # left as it was
    with pytest.raises(UserError, match="adapter directory not found"):
        update_sidecar(tmp_path / "nope", {"eval": {}})


_HOLDER = """
    import sys, time
    from collections.abc import Mapping
    from pathlib import Path
    from gemtune.adapter import update_sidecar

    d, inside, other_done = map(Path, sys.argv[1:4])

    class Sections(Mapping):
        '''The eval's sections; while the update applies them (the sidecar already read), the other process runs.'''
        data = {"eval": {"accuracy": 0.9}, "shippable": True}
        def __getitem__(self, k): return self.data[k]
        def __iter__(self): return iter(self.data)
        def __len__(self): return len(self.data)
        def keys(self):
            inside.touch()
            deadline = time.monotonic() + 3  # with the lock the other update cannot finish meanwhile: wait it out
            while not other_done.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return self.data.keys()

    update_sidecar(d, Sections())
"""

_OTHER = """
    import sys, time
    from pathlib import Path
    from gemtune.adapter import update_sidecar

    d, inside, other_done = map(Path, sys.argv[1:4])
    deadline = time.monotonic() + 120
    while not inside.exists():
        assert time.monotonic() < deadline, "the first process never started its update"
        time.sleep(0.02)
    update_sidecar(d, {"privacy": {"passed": True}})
    other_done.touch()
"""


def test_concurrent_updates_from_two_processes_both_survive(tmp_path):
    """The eval's update has read the sidecar and not yet written it when the probe's update runs: without the
    lock the eval's write would drop the probe's section (the probe's update finishes in between)."""
    d = _adapter(tmp_path / "a", sidecar={"base_model": "b", "step": 60})
    args = [str(d), str(tmp_path / "inside"), str(tmp_path / "other-done")]
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for code in (_HOLDER, _OTHER)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert read_sidecar(d) == {"base_model": "b", "step": 60, "eval": {"accuracy": 0.9}, "shippable": True,
                               "privacy": {"passed": True}}


@pytest.mark.parametrize("sidecar, config_base, want", [
    ({"base_model": "google/gemma-3-270m"}, "peft/base", "google/gemma-3-270m"),   # the string form
    ({"base_model": {"path": "/m/base", "name": "gemma"}}, "peft/base", "/m/base"),  # the mapping form
    ({"base_model": {"name": "gemma"}}, "peft/base", "gemma"),
    ({"base_model": ""}, "peft/base", "peft/base"),                                 # else PEFT's record
    ({"base_model": {}}, "peft/base", "peft/base"),
    (None, "peft/base", "peft/base"),
])
def test_base_resolution_both_shapes(tmp_path, sidecar, config_base, want):
    d = _adapter(tmp_path / "a", base_in_config=config_base, sidecar=sidecar)
    assert base_of(d) == want
    assert base_named_in(read_sidecar(d), json.loads((d / "adapter_config.json").read_text())) == want
    assert base_of(d, "override/base") == "override/base"


def test_base_resolution_without_a_record_names_the_flag(tmp_path):
    d = _adapter(tmp_path / "a", base_in_config=None, sidecar={"step": 1})
    with pytest.raises(UserError, match="pass --base") as e:
        base_of(d)
    assert e.value.file == str(d) and e.value.field == "base_model"
    (d / "adapter_config.json").write_text("{")
    with pytest.raises(UserError, match="adapter_config.json: not valid JSON"):
        base_of(d)


def test_merge_eval_probe_and_registry_resolve_the_base_alike(tmp_path):
    """The stages ask the one function: a mapping-shaped base_model is read the same way everywhere."""
    import gemtune.card as card
    import gemtune.evals.pipeline as pipeline
    import gemtune.privacy.probe as probe
    import gemtune.serve.merge as merge

    assert merge.base_of is base_of and pipeline.base_of is base_of and probe.base_of is base_of
    d = _adapter(tmp_path / "a", sidecar={"base_model": {"path": "/m/base", "name": "gemma"}})
    src = card.Sources(d, "a", json.loads((d / "adapter_config.json").read_text()), read_sidecar(d))
    assert card.base_ids(src)[1] == "/m/base"


def test_weights_sha256_is_stable_and_names_the_weights_only(tmp_path):
    d = _adapter(tmp_path / "a", sidecar={"step": 1})
    first = weights_sha256(d)
    assert first == hashlib.sha256(b"weights-v1").hexdigest() == weights_sha256(d)
    update_sidecar(d, {"eval": {"accuracy": 1.0}})
    write_sidecar(d, {"other": True})
    assert weights_sha256(d) == first  # the sidecar is not part of the weights' identity
    (d / "adapter_model.safetensors").write_bytes(b"weights-v2")
    assert weights_sha256(d) == hashlib.sha256(b"weights-v2").hexdigest() != first
    (d / "adapter_model.safetensors").unlink()
    assert weights_sha256(d) is None


def test_check_adapter_dir(tmp_path):
    with pytest.raises(UserError, match=r'field "--adapter": adapter directory not found$'):
        check_adapter_dir(tmp_path / "nope", field="--adapter")
    with pytest.raises(UserError, match=r"not found \(expected a PEFT adapter dir or `base`\)"):
        check_adapter_dir(tmp_path / "nope", or_base=True)
    with pytest.raises(UserError, match="not a PEFT adapter: adapter_config.json missing"):
        check_adapter_dir(tmp_path)
    assert check_adapter_dir(_adapter(tmp_path / "a")) == tmp_path / "a"


_VERDICT = """
    import sys, time
    from pathlib import Path
    from gemtune.evals import verdicts

    d, inside, other_done, who = *map(Path, sys.argv[1:4]), sys.argv[4]
    verdict = {"adapter_sha256": "w" * 64, "suite_sha256": "s" * 64, "baseline": who, "baseline_id": who,
               "passed": True}
    if who == "first":
        real = verdicts.merged

        def slow_merge(rows, v):  # the first writer has read the verdict list; the second one runs meanwhile
            inside.touch()
            deadline = time.monotonic() + 3  # under the sidecar's lock the second cannot finish: wait it out
            while not other_done.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return real(rows, v)

        verdicts.merged = slow_merge
    else:
        deadline = time.monotonic() + 120
        while not inside.exists():
            assert time.monotonic() < deadline, "the first process never started its update"
            time.sleep(0.02)
    verdicts.record(d, {"shippable": True}, verdict)
    if who != "first":
        other_done.touch()
"""


def test_two_verdicts_recorded_at_once_both_survive(tmp_path):
    """Appending a verdict is a read-modify-write of one section: it runs under the sidecar's lock, so a verdict
    recorded by another process meanwhile is kept (reading the list outside the lock dropped it)."""
    d = _adapter(tmp_path / "a", sidecar={"base_model": "b"})
    args = [str(d), str(tmp_path / "inside"), str(tmp_path / "other-done")]
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_VERDICT), *args, who], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for who in ("first", "second")]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out
    assert sorted(v["baseline_id"] for v in read_sidecar(d)["eval_verdicts"]) == ["first", "second"]
