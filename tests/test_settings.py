"""Each setting is declared once (app.config): the flags, their defaults and the GPTOSS_*
variables are made from the declarations, and read a value alike.

Breakage caught: a flag added by hand in build_parser (or a variable read by hand in app.asgi),
a flag whose default is not its field's, a variable that reads a value otherwise than its flag,
README's list of variables out of step with the declarations.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import fields

import pytest

from app.asgi import config_from_env
from app.cli import build_parser, config_from_args
from app.config import CONCERNS, Profile, ServerConfig, Setting, every_setting
from app.config.declare import declared, flag_default
from tests.test_readme import README

# A value each setting accepts that is not its default, as its flag (and its variable) is given it.
SAMPLES = {
    "--model": "tiny-gpt-oss",
    "--served-model-name": "our-model",
    "--dtype": "float16",
    "--device": "cpu",
    "--generation-config": "vllm",
    "--chat-template": "/srv/tools.jinja",
    "--tool-call-parser": "none",
    "--profile": "throughput_first",
    "--api-key": "key-one-001, key-two-002,key-one-001",
    "--allowed-origins": "https://a.example, https://b.example",
    "--responses-db": ":memory:",
    "--redis-url": "redis://cache:6390/2",
    "--reasoning-key": "k" * 32,
    "--log-level": "debug",
    "--log-format": "console",
    "--host": "0.0.0.0",
}
# Switches that need another flag to be accepted.
WITH = {"--expert-parallel": ["--tensor-parallel-size", "2"]}


def declared_flags() -> list[str]:
    return [name for _, declaration in every_setting(ServerConfig) for name in declaration.flags]


def parser_flags() -> list[str]:
    return [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option not in ("-h", "--help", "--version")
    ]


def sample(declaration: Setting) -> list[str]:
    name = declaration.flags[0]
    if declaration.switch:
        return [name, *WITH.get(name, [])]
    return [name, SAMPLES.get(name) or ("3" if declaration.read is int else "2.5")]


@pytest.fixture(autouse=True)
def no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, declaration in every_setting(ServerConfig):
        if declaration.env:
            monkeypatch.delenv(declaration.env, raising=False)


def test_the_parser_has_exactly_the_declared_flags() -> None:
    declared = declared_flags()
    assert [name for name, count in Counter(declared).items() if count > 1] == [], "a flag declared twice"
    assert sorted(parser_flags()) == sorted(declared), "a flag not declared in app.config, or one missing"


def test_each_setting_has_one_variable_named_after_its_flag() -> None:
    names = [declaration.env for _, declaration in every_setting(ServerConfig) if declaration.env]
    assert len(names) == len(set(names))
    for _, declaration in every_setting(ServerConfig):
        expected = None if declaration.cli_only else "GPTOSS_" + declaration.flags[0][2:].replace("-", "_").upper()
        assert declaration.env == expected, declaration.flags


def test_the_parsers_defaults_are_the_fields_defaults() -> None:
    actions = {action.dest: action for action in build_parser()._actions}
    for field, declaration in declared(ServerConfig):
        assert actions[declaration.dest].default == flag_default(field, declaration), declaration.flags
    for _, override in declared(Profile):  # the profile's value applies
        assert actions[override.dest].default is None, override.flags
    assert config_from_args(build_parser().parse_args([])) == ServerConfig()
    assert config_from_env({}) == ServerConfig()


def test_every_field_of_the_config_is_a_concerns() -> None:
    owned = [field.name for concern in CONCERNS for field in fields(concern)]
    assert sorted(owned) == sorted(field.name for field in fields(ServerConfig))
    assert len(owned) == len(set(owned)), "a setting declared in two concerns"


@pytest.mark.parametrize(
    "declaration",
    [declaration for _, declaration in every_setting(ServerConfig)],
    ids=lambda declaration: declaration.flags[0],
)
def test_a_flag_and_its_variable_read_a_value_alike(declaration: Setting) -> None:
    args = sample(declaration)
    from_flag = config_from_args(build_parser().parse_args(args))
    assert from_flag != ServerConfig(), f"{args} changed nothing"
    if declaration.env is None:
        return
    text = "1" if declaration.switch else args[1]
    assert config_from_env({declaration.env: text}) == from_flag
    assert config_from_env({declaration.env: ""}) == ServerConfig(), "an empty variable keeps the default"


def test_readme_lists_the_variables_app_asgi_reads() -> None:
    paragraph = README[README.index("`app.asgi` reads its settings") :].split("\n\n")[0]
    listed = re.findall(r"`(GPTOSS_[A-Z_]+)`", paragraph)
    declared = [declaration.env for _, declaration in every_setting(ServerConfig) if declaration.env]
    assert sorted(set(listed)) == sorted(declared)
    for _, declaration in every_setting(ServerConfig):
        if declaration.cli_only:
            assert f"`{declaration.flags[0]}`" in paragraph, f"README does not say {declaration.flags[0]} has none"
