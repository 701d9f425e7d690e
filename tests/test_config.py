"""One way to read gemtune.yaml: every stage's config gives the same errors, reads `base:` the same way, warns
(not refuses) on values the playbook only advises against; `--help` lists the verbs in playbook order."""

from __future__ import annotations

import json
import random
import re

import pytest

from gemtune.config import parse_yaml, read_yaml
from gemtune.data.config import load_data_config
from gemtune.errors import UserError
from gemtune.evals.config import load_eval_config
from gemtune.privacy.config import load_privacy_config
from gemtune.train.config import load_train_config

# section -> (loader taking (path, overrides), a field whose value 0 is invalid, its message, a flag for it)
STAGES = {
    "data": (load_data_config, "max_tokens", "Input should be greater than or equal to 8 (got 0)", "--max-tokens"),
    "train": (load_train_config, "batch_size", "Input should be greater than or equal to 1 (got 0)", "--batch-size"),
    "eval": (lambda p, o=None: load_eval_config(p, **(o or {})), "batch_size",
             "Input should be greater than or equal to 1 (got 0)", "--batch-size"),
    "privacy": (load_privacy_config, "batch_size", "Input should be greater than or equal to 1 (got 0)",
                "--batch-size"),
}


def _raises(fn) -> UserError:
    with pytest.raises(UserError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("section", list(STAGES))
def test_a_bad_value_is_file_line_field_in_every_stage(section, tmp_path):
    load, key, msg, _ = STAGES[section]
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"base: gemma-3-270m\n{section}:\n  seed: 3\n  {key}: 0\n", encoding="utf-8")
    e = _raises(lambda: load(y))
    assert str(e) == f'{y}:4: field "{section}.{key}": {msg}'
    assert (e.file, e.line, e.field) == (str(y), 4, f"{section}.{key}")


@pytest.mark.parametrize("section", list(STAGES))
def test_unknown_key_names_its_line_and_the_closest_field(section, tmp_path):
    load, key, _, _ = STAGES[section]
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"{section}:\n  seed: 3\n  {key}x: 4\n", encoding="utf-8")
    assert str(_raises(lambda: load(y))) == f"{y}:3: field \"{section}.{key}x\": unknown key (did you mean '{key}'?)"
    y.write_text(f"{section}:\n  seed: 3\n  zzz: 4\n", encoding="utf-8")
    assert str(_raises(lambda: load(y))) == f'{y}:3: field "{section}.zzz": unknown key'


def test_unknown_nested_key_names_its_line(tmp_path):
    y = tmp_path / "gemtune.yaml"
    y.write_text("train:\n  lr: 0.001\n  lora:\n    r: 16\n    dropot: 0.1\n", encoding="utf-8")
    assert str(_raises(lambda: load_train_config(y))) == \
        f"{y}:5: field \"train.lora.dropot\": unknown key (did you mean 'dropout'?)"


@pytest.mark.parametrize("section", list(STAGES))
def test_file_shape_errors_are_the_same_in_every_stage(section, tmp_path):
    load = STAGES[section][0]
    y = tmp_path / "gemtune.yaml"
    e = _raises(lambda: load(tmp_path / "missing.yaml"))
    assert str(e) == f'{tmp_path / "missing.yaml"}: field "--config": config file not found'
    y.write_text("", encoding="utf-8")
    assert load(y) == load(None)  # an empty file is all defaults (no ./gemtune.yaml in the test's cwd)
    y.write_text(f"{section}:\n", encoding="utf-8")
    assert load(y) == load(None)
    y.write_text("# not a project file\n- data\n- train\n", encoding="utf-8")
    assert str(_raises(lambda: load(y))).startswith(f"{y}:2: the config must be a mapping")
    y.write_text(f"base: gemma-3-270m\n{section}: [1, 2]\n", encoding="utf-8")
    assert str(_raises(lambda: load(y))) == f'{y}:2: field "{section}": `{section}:` must be a mapping of options'
    y.write_text(f"{section}:\n  seed: [1, 2\n", encoding="utf-8")
    assert str(_raises(lambda: load(y))).startswith(f"{y}:3: invalid YAML:")


@pytest.mark.parametrize("section", list(STAGES))
def test_a_flag_error_names_the_flag(section, tmp_path):
    load, key, msg, flag = STAGES[section]
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"{section}:\n  {key}: 16\n", encoding="utf-8")
    e = _raises(lambda: load(y, {key: 0}))
    assert str(e) == f'field "{flag}": {msg}; {flag} sets {section}.{key}'
    assert getattr(load(y, {key: None}), key) == 16  # None = flag not given: the file's value stands
    assert getattr(load(y, {key: 32}), key) == 32


def test_a_nested_flag_is_named_as_typed(tmp_path):
    e = _raises(lambda: load_train_config(None, {"lora.r": 12}))
    assert e.field == "--rank" and "sets train.lora.r" in str(e) and "(got 12)" in str(e)
    assert load_train_config(None, {"lora.r": 32}).lora.r == 32


BASE_FORMS = ["base: {b}", "base: {{model: {b}}}", "base: {{name: {b}}}", "base: {{path: {b}}}",
              "base:\n  path: {b}\n  revision: main"]


@pytest.mark.parametrize("form", BASE_FORMS)
def test_base_forms_are_read_the_same_by_every_stage(form, tmp_path):
    y = tmp_path / "gemtune.yaml"
    y.write_text(form.format(b="/models/my-base") + "\ntrain:\n  lr: 0.001\n", encoding="utf-8")
    assert load_data_config(y).base == "/models/my-base"
    assert load_train_config(y).base == "/models/my-base"
    assert load_eval_config(y) == load_eval_config(None)  # no base field of their own; the form is accepted
    assert load_privacy_config(y) == load_privacy_config(None)
    # inside a section the same forms are accepted and win over the top level
    y.write_text("base: top\n" + "\n".join(f"{s}:\n  " + form.format(b="/models/sec").replace("\n", "\n  ")
                                             for s in ("data", "train")) + "\n", encoding="utf-8")
    assert load_data_config(y).base == load_train_config(y).base == "/models/sec"
    assert load_train_config(y, {"base": "flag"}).base == "flag"


@pytest.mark.parametrize("section", list(STAGES))
def test_a_malformed_base_is_refused_by_every_stage(section, tmp_path):
    load = STAGES[section][0]
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"{section}:\n  seed: 1\nbase:\n  modle: gemma-3-270m\n", encoding="utf-8")
    e = _raises(lambda: load(y))
    assert (e.file, e.line, e.field) == (str(y), 3, "base")
    assert "mapping with one of model, name, path" in str(e)


def test_generic_fraction_zero_warns_and_builds(tiny_gemma3, tmp_path, capsys):
    from gemtune.cli import main

    rng = random.Random(0)
    words = "card refund transfer login fee address fraud cancel statement pin account balance limit app".split()
    queues = ["billing", "refunds", "fraud", "access"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(
        {"input": " ".join(rng.choice(words) for _ in range(9)) + f" case {i}", "output": queues[i % 4]}) + "\n"
        for i in range(60)), encoding="utf-8")
    (tmp_path / "generic.jsonl").write_text("".join(json.dumps(
        {"instruction": f"Write a poem number {k} about " + " ".join(rng.choice(words) for _ in range(6)),
         "output": f"poem {k}"}) + "\n" for k in range(30)), encoding="utf-8")
    y = tmp_path / "gemtune.yaml"
    y.write_text(f"base: {tiny_gemma3}\ndata:\n  instruction: Route it.\n  generic_fraction: 0\n", encoding="utf-8")
    try:
        main(["data", "build", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "ds"), "--config", str(y),
              "--generic", str(tmp_path / "generic.jsonl"), "-q"])
        code = 0
    except SystemExit as e:
        code = e.code
    err = " ".join(capsys.readouterr().err.split())
    assert code == 0, err
    assert f'warning: {y}:4: field "data.generic_fraction": 0 is outside the advised 0.05–0.1' in err
    train = [json.loads(line) for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    assert train and not [r for r in train if r["task"] == "generic"]
    assert json.loads((tmp_path / "ds" / "report.json").read_text())["generic"]["added"] == 0


def test_advice_is_a_warning_nonsense_is_refused(tmp_path, capsys):
    cfg = load_data_config(None, {"generic_fraction": 0.3, "eval_fraction": 0.3})
    assert (cfg.generic_fraction, cfg.eval_fraction) == (0.3, 0.3)
    err = capsys.readouterr().err
    assert 'warning: field "--generic-fraction": 0.3 is outside the advised 0.05–0.1' in err
    assert 'warning: field "--eval-fraction": 0.3 is outside the advised 0.1–0.15' in err
    assert load_data_config(None, {"generic_fraction": 0.07}) and capsys.readouterr().err == ""
    for bad in (-0.01, 1.0, 2):
        assert _raises(lambda: load_data_config(None, {"generic_fraction": bad})).field == "--generic-fraction"
    assert _raises(lambda: load_data_config(None, {"eval_fraction": 0})).field == "--eval-fraction"


def test_unknown_section_is_a_warning_with_its_line(tmp_path, capsys):
    y = tmp_path / "gemtune.yaml"
    y.write_text("train:\n  lr: 0.001\ntrian:\n  lr: 0.1\n", encoding="utf-8")
    assert load_train_config(y).lr == 0.001
    err = capsys.readouterr().err
    assert f"warning: {y}:3: field \"trian\": unknown section, ignored (did you mean 'train'?)" in err


def test_read_yaml_gives_lines_of_key_paths(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("admin_key: k\ntenants:\n  acme:\n    adapters:\n      - a\n      - b*\n", encoding="utf-8")
    doc = read_yaml(y)
    assert doc.data["tenants"]["acme"]["adapters"] == ["a", "b*"]
    assert (doc.line("tenants"), doc.line("tenants", "acme", "adapters"), doc.line("tenants", "acme", "adapters", 1)) \
        == (2, 4, 6)
    assert doc.line("tenants", "nope") == 2 and doc.line("nope") is None  # deepest existing parent
    assert str(doc.error("bad", "tenants", "acme")) == f'{y}:3: field "tenants.acme": bad'
    assert str(_raises(lambda: read_yaml(tmp_path / "none.yaml", what="tenants file"))) == \
        f"{tmp_path / 'none.yaml'}: tenants file not found"
    y.write_text("a: 1\nb: [2\n", encoding="utf-8")
    assert str(_raises(lambda: read_yaml(y))).startswith(f"{y}:3: invalid YAML")
    # a block inside a larger file (a card's front matter starts on line 2)
    doc = parse_yaml("license: x\ntags: [a]\n", "README.md", first_line=2)
    assert doc.line("tags") == 3
    assert str(_raises(lambda: parse_yaml("a: [1\n", "README.md", first_line=2))).startswith("README.md:3: invalid")


def test_help_lists_the_verbs_in_playbook_order():
    from typer.testing import CliRunner

    from gemtune.cli import app

    out = CliRunner().invoke(app, ["--help"], terminal_width=100).output
    verbs = re.findall(r"^│ (\w+) ", out, flags=re.M)
    assert verbs == ["base", "data", "plan", "train", "eval", "probe", "card", "registry", "release", "serve", "merge", "demo"]
