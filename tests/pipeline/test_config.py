import dataclasses
from typing import Literal

import pytest

from pipeline.config import ConfigError, from_dict, opt, parse_config, to_yaml


@dataclasses.dataclass
class Inner:
    temperature: float = opt(1.0, "sampling temperature")
    kind: Literal["a", "b"] = opt("a", "which kind")


@dataclasses.dataclass
class Root:
    name: str = opt("x", "a name")
    steps: int = opt(3, "how many")
    local: bool = opt(False, "local mode")
    tags: list[str] = opt(factory=list, help="tags")
    inner: Inner = opt(factory=Inner)


def test_defaults_yaml_and_dotted_flags_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\ninner:\n  temperature: 0.5\n")
    cfg = parse_config(Root, ["--config", str(path), "--inner.temperature", "0.7", "--local", "--tags", "a,b"])
    assert (cfg.steps, cfg.inner.temperature, cfg.local, cfg.tags, cfg.name) == (7, 0.7, True, ["a", "b"], "x")


def test_equals_form_and_bool_value():
    cfg = parse_config(Root, ["--steps=5", "--local", "false", "--inner.kind", "b"])
    assert (cfg.steps, cfg.local, cfg.inner.kind) == (5, False, "b")


def test_help_lists_every_field_with_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Root, ["--help"], "Demo job.")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("--name", "--steps", "--local", "--tags", "--inner.temperature", "--inner.kind"):
        assert name in text
    assert "(default: 0.7)" not in text and "(default: 1.0)" in text and "sampling temperature" in text


@pytest.mark.parametrize("argv, message", [
    (["--steps", "abc"], "--steps: expects int"),
    (["--steps", "1.5"], "whole number"),
    (["--inner.kind", "c"], r"not one of \['a', 'b'\]"),
    (["--inner.temprature", "1"], "did you mean --inner.temperature"),
    (["--steps"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_flags_name_the_field_and_fix(argv, message):
    with pytest.raises(SystemExit, match=message):
        parse_config(Root, argv)


def test_unknown_yaml_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="inner.temprature"):
        from_dict(Root, {"inner": {"temprature": 1}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        parse_config(Root, ["--config", str(bad)])


def test_yaml_round_trip():
    cfg = parse_config(Root, ["--inner.temperature", "0.25"])
    import yaml
    assert from_dict(Root, yaml.safe_load(to_yaml(cfg))) == cfg


def test_a_section_keeps_the_defaults_its_parent_gives_it(tmp_path):
    # regression: a `ray:` section in jobs.rlhf's YAML rebuilt RayConfig from the class defaults, so the job's own
    # default for it (log_to_driver false) came back true as soon as the YAML set any ray field
    @dataclasses.dataclass
    class Parent:
        inner: Inner = opt(factory=lambda: Inner(kind="b"))

    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  temperature: 0.5\n")
    assert parse_config(Parent, ["--config", str(path)]) == Parent(Inner(temperature=0.5, kind="b"))
    assert parse_config(Parent, ["--inner.kind", "a"]).inner == Inner(kind="a")
    assert parse_config(Parent, []).inner == Inner(kind="b")
