"""Bad inputs to `gemtune probe` and `gemtune card`: exit 2 with a message naming the file, line and field, no
traceback, and no report left behind."""

import json
import shutil

import pytest

from gemtune.errors import UserError
from gemtune.privacy.config import load_privacy_config


def _copy_data(memorised, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(memorised.data, d)
    c = tmp_path / "canaries.json"
    shutil.copy(memorised.canaries, c)
    return d, c


def _edit_canaries(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


CASES = {
    "missing adapter": (lambda d, c, t: ["--adapter", t / "nope"], ["nope", "adapter directory not found"]),
    "not a dataset": (lambda d, c, t: ["--data", t], ['field "--data"', "train.jsonl is missing"]),
    "malformed train line": (
        lambda d, c, t: (d.joinpath("train.jsonl").write_text(d.joinpath("train.jsonl").read_text() + "{oops\n"),
                         ["--data", d])[1], ["train.jsonl:40:", "not valid JSON"]),
    "message without role": (
        lambda d, c, t: (d.joinpath("train.jsonl").write_text(json.dumps({"messages": [{"content": "x"}]}) + "\n"),
                         ["--data", d])[1], ["train.jsonl:1:", 'field "messages[0]"']),
    "canary row not in train": (
        lambda d, c, t: (_edit_canaries(c, lambda doc: doc["canaries"][0].update(row_id="zzz")),
                         ["--canaries", c])[1], ["canaries.json", 'field "canaries[0].row_id"', "'zzz'"]),
    "canary secret off format": (
        lambda d, c, t: (_edit_canaries(c, lambda doc: doc["canaries"][0].update(secret="abc")),
                         ["--canaries", c])[1], ['field "canaries[0].secret"', "does not match its format"]),
    "canaries not JSON": (lambda d, c, t: (c.write_text("{"), ["--canaries", c])[1], ["canaries.json", "cannot read"]),
    "canaries file missing": (lambda d, c, t: ["--canaries", t / "none.json"], ["none.json", 'field "--canaries"']),
    "candidates below 2": (lambda d, c, t: ["--candidates", "1"], ['field "--candidates"', "sets privacy.candidates"]),
    "out is a directory": (lambda d, c, t: ["--out", t], ['field "--out"', "not a directory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_probe_inputs_exit_2(case, memorised, cli, tmp_path, capsys):
    d, c = _copy_data(memorised, tmp_path)
    extra, expect = CASES[case]
    out = tmp_path / "report.json"
    args = {"--adapter": str(memorised.adapter), "--data": str(d), "--out": str(out), "--canaries": str(c)}
    given = [str(x) for x in extra(d, c, tmp_path)]
    for k, v in zip(given[::2], given[1::2]):
        args[k] = v
    argv = ["probe"] + [x for kv in args.items() for x in kv]
    assert cli(argv) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "Traceback" not in err
    for piece in expect:
        assert piece in err, (piece, err)
    assert not out.is_file()


def test_candidates_beyond_the_format_space(memorised, cli, tmp_path, capsys):
    d, c = _copy_data(memorised, tmp_path)
    secret = json.loads(c.read_text())["canaries"][0]["secret"]
    _edit_canaries(c, lambda doc: doc["canaries"][0].update(format="##", secret="12", text="my account code is 12"))
    d.joinpath("train.jsonl").write_text(d.joinpath("train.jsonl").read_text().replace(secret, "12"))
    rc = cli(["probe", "--adapter", memorised.adapter, "--data", d, "--out", tmp_path / "r.json", "--canaries", c,
              "--candidates", "200"])  # "##" allows 100 secrets
    err = capsys.readouterr().err.replace("\n", "")
    assert rc == 2 and 'field "candidates"' in err and "allows only 100 secrets" in err


def test_no_data_and_none_recorded(memorised, make_zero_adapter, cli, tmp_path, capsys):
    adapter = make_zero_adapter(memorised.base, tmp_path / "adapter")  # gemtune.json without a dataset dir
    assert cli(["probe", "--adapter", adapter, "--out", tmp_path / "r.json"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "gemtune.json" in err and 'field "dataset.dir"' in err and "no --data given" in err


def test_privacy_config_errors_name_the_yaml_line_and_field(tmp_path):
    cfg = tmp_path / "gemtune.yaml"
    cfg.write_text("data:\n  eval_fraction: 0.12\nprivacy:\n  samples: 8\n  max_extraction_rate: 2\n")
    with pytest.raises(UserError) as e:
        load_privacy_config(cfg)
    assert (e.value.file, e.value.line, e.value.field) == (str(cfg), 5, "privacy.max_extraction_rate")
    cfg.write_text("privacy:\n  sample: 8\n")
    with pytest.raises(UserError) as e:
        load_privacy_config(cfg)
    assert e.value.line == 2 and e.value.field == "privacy.sample" and "unknown key" in str(e.value)
    cfg.write_text("privacy: [1]\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_privacy_config(cfg)
    cfg.write_text("privacy:\n  candidates: 100\n")
    assert load_privacy_config(cfg, {"candidates": 32, "samples": None}).candidates == 32  # flags win, None = unset
    with pytest.raises(UserError, match="config file not found"):
        load_privacy_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("case", ["missing adapter", "bad sidecar", "eval dir without summary", "not a probe report"])
def test_bad_card_inputs_exit_2(case, memorised, cli, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(memorised.adapter, adapter)
    args = ["card", "--adapter", adapter, "--out", tmp_path / "README.md"]
    expect = []
    if case == "missing adapter":
        args[2] = tmp_path / "nope"
        expect = ["nope", 'field "--adapter"']
    elif case == "bad sidecar":
        (adapter / "gemtune.json").write_text("{not json")
        expect = ["gemtune.json", "not valid JSON"]
    elif case == "eval dir without summary":
        args += ["--eval", tmp_path]
        expect = ['field "--eval"', "no summary.json"]
    else:
        (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
        args += ["--probe", tmp_path / "x.json"]
        expect = ["x.json", 'field "--probe"', "not a `gemtune probe` report"]
    assert cli(args) == 2
    err = capsys.readouterr().err.replace("\n", "")
    for piece in expect:
        assert piece in err, (piece, err)
    assert not (tmp_path / "README.md").exists()
