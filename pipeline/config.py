"""One typed config tree: dataclasses, read from YAML, overridden by dotted command-line flags.

    python -m jobs.X --config run.yaml --rollout.temperature 0.7 --local

Every job defines a root dataclass whose fields are values or nested dataclasses. `parse_config` builds
it from defaults <- YAML file <- flags, checks every value against its declared type, and `--help` lists
every field with its type, default and help text.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field and how to fix it."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with help text. Use `factory=` for mutable defaults (lists, nested configs)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flat_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted name, type, field) for every leaf field of a config dataclass, depth first."""
    out = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out += _flat_fields(tp, name + ".")
        else:
            out.append((name, tp, f))
    return out


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if get_origin(tp) is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert `value` (from YAML or a flag string) to the declared type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot use {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or str(value) == str(c):
                return c
        raise ConfigError(f"--{name}: {value!r} is not one of {list(choices)}; pick one of those.")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            value = [value]
        return [coerce(f"{name}[{i}]", item_tp, v) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"--{name}: expects a mapping such as '{{a: 1}}', got {value!r}.")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expects true or false, got {value!r}.")
    if tp in (int, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expects {tp.__name__}, got {value!r}.") from None
        if tp is int and not number.is_integer():
            raise ConfigError(f"--{name}: expects a whole number, got {value!r}.")
        return int(number) if tp is int else number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--{name}: expects a string, got {value!r}.")
        return "" if value is None else str(value)
    raise ConfigError(f"--{name}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """Build config dataclass `cls` from a nested dict (e.g. parsed YAML); unknown keys are errors. Keys not given
    keep `base`'s values: a section's defaults as its parent's factory makes them (e.g. jobs.rlhf's ray section)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expects a mapping, got {data!r}.")
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(f"unknown config key '{prefix}{key}'" + (f"; did you mean '{prefix}{hint[0]}'?" if hint else "."))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            section = getattr(base, f.name) if base is not None else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            kwargs[f.name] = from_dict(tp, data[f.name] or {}, prefix + f.name + ".", section)
        else:
            kwargs[f.name] = coerce(prefix + f.name, tp, data[f.name])
    return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value


def help_text(cls: type, prog: str, description: str) -> str:
    lines = [f"usage: {prog} [--config FILE.yaml] [--FIELD VALUE ...]", "", description.strip(), "",
             "  --config FILE.yaml   read values from a YAML file (flags given after it override it)", ""]
    defaults = to_dict(cls())
    for name, tp, f in _flat_fields(cls):
        d = defaults
        for k in name.split("."):
            d = d[k]
        lines.append(f"  --{name} {_type_name(tp)}  (default: {d!r})")
        if f.metadata.get("help"):
            lines.append(f"        {f.metadata['help']}")
    return "\n".join(lines)


def parse_config(cls: type, argv: list[str] | None = None, description: str = "", prog: str | None = None) -> Any:
    """defaults <- --config YAML <- --dotted.flags; returns an instance of `cls` or exits with a clear message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python -m {sys.modules['__main__'].__spec__.name if getattr(sys.modules['__main__'], '__spec__', None) else 'job'}"
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog, description))
        raise SystemExit(0)
    leaves = {name: (tp, f) for name, tp, f in _flat_fields(cls)}
    data: dict = {}
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"{prog}: unexpected argument {arg!r}; options look like --name value (see --help).")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_") if key not in leaves else key
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_flag = key in leaves and leaves[key][0] is bool and (nxt is None or nxt.startswith("--"))
            if is_flag:
                value = "true"
            elif nxt is None:
                raise SystemExit(f"{prog}: --{key} needs a value (see --help).")
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "config":
            try:
                with open(value) as fh:
                    loaded = yaml.safe_load(fh) or {}
            except OSError as e:
                raise SystemExit(f"{prog}: cannot read --config {value!r}: {e.strerror}. Give a readable YAML file.")
            except yaml.YAMLError as e:
                raise SystemExit(f"{prog}: --config {value!r} is not valid YAML: {e}")
            data = _deep_merge(data, loaded)
            continue
        if key not in leaves:
            hint = difflib.get_close_matches(key, leaves, n=1)
            raise SystemExit(f"{prog}: unknown option --{key}" + (f"; did you mean --{hint[0]}?" if hint else " (see --help)."))
        overrides.append((key, value))
    for key, value in overrides:
        set_dotted(data, key, value)
    try:
        return from_dict(cls, data)
    except ValueError as e:  # ConfigError, or a section's own __post_init__ check
        raise SystemExit(f"{prog}: config error: {e}")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
