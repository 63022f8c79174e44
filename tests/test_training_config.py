"""`rnmt train --config FILE`: TOML/YAML/JSON options, the command line wins, errors are one line."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_MODEL, run_rnmt
from rnmt.errors import ConfigError
from rnmt.run_config import load_run_config, merge_options


def test_config_file_options_apply_and_the_command_line_wins(bin_dir, tmp_path):
    sizes = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY_MODEL.items())
    (tmp_path / "run.toml").write_text(
        f'data = "{bin_dir}"\nsave-dir = "{tmp_path / "run"}"\nlr = 0.002\n'
        f'max_steps = 2\nmax-tokens = 400\ndevice = "cpu"\nvalid_bleu = true\n'
        f'[model]\n{sizes}\ntie_embeddings = true\nreverse_source = true\n'
    )
    # Every on/off option has its --no- form: what a file turns on, the command line can
    # turn off (`--no-valid-bleu` was an unknown option).
    result = run_rnmt("train", "--config", str(tmp_path / "run.toml"), "--lr", "0.004",
                      "--no-plot", "--no-valid-bleu", "--no-tie-embeddings")
    assert result.returncode == 0, result.stderr.decode()
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["valid_bleu"] is False and resolved["tie_embeddings"] is False
    assert resolved["reverse_source"] is True
    assert resolved["lr"] == 0.004 and resolved["max_steps"] == 2
    assert resolved["max_tokens"] == 400 and resolved["emb_dim"] == TINY_MODEL["emb_dim"]
    assert resolved["plot"] is False and resolved["optimizer"] == "adam"
    # the resolved config is itself a config file that reproduces the run's options
    again = load_run_config(tmp_path / "run" / "config.json")
    assert again == resolved


def test_unknown_option_in_a_config_file_is_a_one_line_error(tmp_path):
    (tmp_path / "run.toml").write_text('learning_rate = 0.1\n')
    result = run_rnmt("train", "x", "--save-dir", str(tmp_path), "--config",
                      str(tmp_path / "run.toml"))
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        f"rnmt: error: {tmp_path / 'run.toml'}: unknown option(s) learning_rate"]


def test_yaml_reads_like_toml(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "a.yaml").write_text("lr: 1.0e-3\nmodel:\n  emb-dim: 64\n")
    (tmp_path / "a.toml").write_text("lr = 1.0e-3\n[model]\nemb-dim = 64\n")
    assert load_run_config(tmp_path / "a.yaml") == load_run_config(tmp_path / "a.toml") \
        == {"lr": 1e-3, "emb_dim": 64}


def test_explicit_command_line_options_beat_the_file():
    merged = merge_options({"lr": 0.1, "seed": 1}, {"lr"}, {"lr": 0.5, "seed": 7}, "f")
    assert merged == {"lr": 0.1, "seed": 7}
    with pytest.raises(ConfigError, match="unknown option"):
        merge_options({"lr": 0.1}, set(), {"lrr": 0.5}, "f")


def test_file_values_take_the_options_types(tmp_path):
    from pathlib import Path
    from typing import Optional

    from rnmt.run_config import coerce

    assert coerce("1e-3", float, "lr", "f") == 1e-3  # how PyYAML reads 1e-3
    assert coerce(None, Optional[int], "max_steps", "f") is None
    assert coerce("runs/x", Optional[Path], "save_dir", "f") == Path("runs/x")
    assert coerce("no", bool, "plot", "f") is False
    with pytest.raises(ConfigError, match=r"option max_tokens = 'many' is not of its type \(int\)"):
        coerce("many", int, "max_tokens", "f")


@pytest.mark.parametrize("value, hint, expected", [
    ("on", bool, True), ("OFF", bool, False), (1, bool, True), ("0", bool, False),
    (True, bool, True), (2.0, int, 2), ("3", int, 3), (3, float, 3.0), (5, str, "5"),
])
def test_file_values_convert_as_the_command_line_would(value, hint, expected):
    from rnmt.run_config import coerce

    converted = coerce(value, hint, "x", "f")
    assert converted == expected and type(converted) is hint


@pytest.mark.parametrize("value, hint", [
    ("maybe", bool), (2.5, int), (True, int), (False, float), ([1, 2], str), (True, str),
    ({"a": 1}, float),
])
def test_file_values_of_another_type_are_refused(value, hint):
    from rnmt.run_config import coerce

    with pytest.raises(ConfigError, match=f"f: option x = .* is not of its type \\({hint.__name__}\\)"):
        coerce(value, hint, "x", "f")


def test_a_yaml_file_without_pyyaml_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    (tmp_path / "run.yaml").write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match="need PyYAML .*or write the file as TOML"):
        load_run_config(tmp_path / "run.yaml")


@pytest.mark.parametrize("name, content, message", [
    ("absent.toml", None, "no such config file"),
    ("bad.toml", b"lr = = 1\n", "invalid TOML"),
    ("bad.yaml", b"lr: [1\n", "invalid YAML"),
    ("bad.json", b'{"lr": 1,}', "invalid JSON"),
    ("run.ini", b"[x]\nlr = 1\n", "unknown config format '.ini'"),
    ("latin1.toml", b'data = "caf\xe9"\n', "cannot read config file"),
    ("list.json", b"[1, 2]", "must map option names to values"),
    ("nested.toml", b"lr = [1, 2]\n", "option 'lr' must be a single value"),
    ("twice.toml", b"[a]\nlr = 1\n[b]\nlr = 2\n", "option 'lr' given twice"),
    ("twice.yaml", b"save-dir: a\nsave_dir: b\n", "option 'save_dir' given twice"),
])
def test_a_broken_config_file_is_one_error_naming_it(tmp_path, name, content, message):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_run_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_an_empty_config_file_sets_nothing(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    (tmp_path / "empty.toml").write_text("")
    assert load_run_config(tmp_path / "empty.yaml") == {}
    assert load_run_config(tmp_path / "empty.toml") == {}


def test_a_broken_config_file_stops_train_in_one_line(tmp_path):
    (tmp_path / "run.toml").write_text("lr = = 1\n")
    result = run_rnmt("train", "--config", str(tmp_path / "run.toml"))
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rnmt: error: {tmp_path / 'run.toml'}: "
                                                   "invalid TOML")
