"""Run configuration files: `rnmt train --config run.toml` (or .yaml / .yml / .json).

A file holds option names (as on the command line, `-` or `_` alike) and values:

    # run.toml                              # run.yaml
    data = "bin"                            data: bin
    save_dir = "runs/x"                     save-dir: runs/x
    lr = 0.003                              lr: 0.003
    [model]                                 model:
    emb_dim = 128                             emb-dim: 128

Tables/sections only group options for the reader: `[model] emb_dim` is `emb_dim`. TOML is
read by the standard library (tomllib, Python 3.11+; tomli before); YAML needs PyYAML,
which rnmt does not depend on. `config.json`, which training writes into its save
directory, is itself a valid config file: the run it came from, fully resolved.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

from rnmt.errors import ConfigError


def _parse(path: Path, text: str) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ConfigError(f"{path}: reading TOML needs Python 3.11+ or tomli") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML config files need PyYAML (pip install pyyaml); "
                              "or write the file as TOML") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML ({first})") from None
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err})") from None
    raise ConfigError(f"{path}: unknown config format {suffix or '(no suffix)'!r}; "
                      "use .toml, .yaml, .yml or .json")


def load_run_config(path: str | Path) -> dict[str, Any]:
    """The options of a config file as a flat dict, keys with `_` (`save-dir` -> `save_dir`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read config file ({err})") from None
    parsed = _parse(path, text)
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise ConfigError(f"{path}: a config file must map option names to values")
    flat: dict[str, Any] = {}
    for key, value in parsed.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, val in items:
            if isinstance(val, (dict, list)):
                raise ConfigError(f"{path}: option {name!r} must be a single value")
            name = str(name).replace("-", "_")
            if name in flat:
                raise ConfigError(f"{path}: option {name!r} given twice")
            flat[name] = val
    return flat


def merge_options(defaults_and_cli: dict[str, Any], explicit: set[str],
                  from_file: dict[str, Any], source: str) -> dict[str, Any]:
    """Command line > config file > defaults. `explicit` names the options given on the
    command line; an option of the file that the command does not know is a ConfigError."""
    unknown = sorted(set(from_file) - set(defaults_and_cli))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}")
    merged = dict(defaults_and_cli)
    for name, value in from_file.items():
        if name not in explicit:
            merged[name] = value
    return merged


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    """A file's value as the option's type (`int | None`, `float`, `bool`, `str`, `Path`),
    as the command line would convert it: PyYAML reads `1e-3` as a string, TOML has no
    paths. A value that does not fit is a ConfigError naming the option."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE + _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if hint in (str, Path):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        kind = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{source}: option {name} = {value!r} is not of its type ({kind})"
                          ) from None
    return value
