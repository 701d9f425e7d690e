"""Config errors name the field (and YAML line); the split is stratified, exact in size and deterministic."""

from __future__ import annotations

from collections import Counter

import pytest

from gemtune.data.balance import balance
from gemtune.data.config import DataConfig, load_data_config, parse_map_flags
from gemtune.data.split import stratified_split
from gemtune.errors import UserError


def test_yaml_section_flags_override_and_field_errors(tmp_path):
    y = tmp_path / "gemtune.yaml"
    y.write_text("base: my-base\ndata:\n  instruction: Route it.\n  eval_fraction: 0.11\n  columns:\n    input: text\n")
    cfg = load_data_config(y, {"eval_fraction": 0.13, "columns": {"output": "category"}, "seed": None})
    assert cfg.eval_fraction == 0.13 and cfg.instruction == "Route it." and cfg.base == "my-base"
    assert cfg.columns == {"input": "text", "output": "category"}
    y.write_text("data:\n  instruction: Route it.\n  eval_fraction: 1.5\n")  # 0.5 is only advised against
    with pytest.raises(UserError) as e:
        load_data_config(y)
    assert str(e.value).startswith(f"{y}:3: field \"data.eval_fraction\"")
    y.write_text("data:\n  eval_fractoin: 0.12\n")
    with pytest.raises(UserError, match="data.eval_fractoin"):
        load_data_config(y)
    y.write_text("data: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_data_config(y)
    with pytest.raises(UserError, match="--generic-fraction"):
        load_data_config(None, {"generic_fraction": 1.0})  # 0.5 is only advised against
    with pytest.raises(UserError, match="config file not found"):
        load_data_config(tmp_path / "missing.yaml")


def test_map_flags():
    assert parse_map_flags(["input=text", "output = category"]) == {"input": "text", "output": "category"}
    with pytest.raises(UserError, match="FIELD=COLUMN"):
        parse_map_flags(["text"])
    with pytest.raises(Exception):
        DataConfig(columns={"inptu": "text"})


def test_split_is_stratified_exact_and_order_independent():
    rows = [("route", q, f"{q}-{i:04d}", None) for q, n in (("a", 100), ("b", 50), ("c", 7), ("d", 1)) for i in range(n)]
    chosen = stratified_split(rows, 0.12, seed=0)
    assert len(chosen) == round(0.12 * len(rows))
    per = Counter(rows[i][1] for i in chosen)
    assert per["a"] == 12 and per["b"] == 6 and per["c"] in (0, 1)
    shuffled = rows[::-1]
    again = stratified_split(shuffled, 0.12, seed=0)
    assert {rows[i][2] for i in chosen} == {shuffled[i][2] for i in again}
    assert {rows[i][2] for i in stratified_split(rows, 0.12, seed=1)} != {rows[i][2] for i in chosen}


def test_pins_are_respected():
    rows = [("t", None, f"s{i}", "eval" if i < 3 else ("train" if i < 50 else None)) for i in range(100)]
    chosen = stratified_split(rows, 0.10, seed=0)
    assert {0, 1, 2} <= chosen and not chosen & set(range(3, 50)) and len(chosen) == 10


def test_balance_caps_at_multiple_of_median():
    rows = [("t", lab, f"{lab}{i}") for lab, n in (("a", 10), ("b", 12), ("c", 100)) for i in range(n)]
    removed, rep = balance(rows, 2.0)
    assert rep["median"] == 12 and rep["cap"] == 24 and len(removed) == 76
    assert rep["after"] == {"t/a": 10, "t/b": 12, "t/c": 24}
    assert balance(rows, None)[0] == set()


def test_cli_reports_yaml_errors_with_file_line_and_field(cli, tmp_path, capsys):
    y = tmp_path / "gemtune.yaml"
    y.write_text("data:\n  max_tokens: lots\n")
    (tmp_path / "in.jsonl").write_text('{"input": "a", "output": "b"}\n')
    code = cli("data", "build", tmp_path / "in.jsonl", "--out", tmp_path / "o", "--config", y)
    err = capsys.readouterr().err
    assert code == 2 and f"{y}:2:" in err and 'field "data.max_tokens"' in err
