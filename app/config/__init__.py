"""The server's settings: frozen, validated at construction, each declared once.

Every setting is one field of a settings dataclass, one per concern (app.config.model:
ModelSettings; app.config.settings: scheduling, HTTP, access, stores, logging; the scheduler
profiles' overrides on app.config.profiles.Profile). The field holds the default, the flag's
name(s), its help and how its text is read (app.config.declare.setting); ``python -m app``'s
flags (app.cli.build_parser) and the GPTOSS_* variables of ``app.asgi`` are made from it.

To add a flag: add one field to the concern's dataclass, e.g.

    grammar_compile_timeout: float = setting(
        10.0, "--grammar-compile-timeout", read=float, help="seconds a grammar may take to compile"
    )

(its variable is GPTOSS_GRAMMAR_COMPILE_TIMEOUT; ``cli_only=True`` for none), check its value
in that dataclass's ``__post_init__``, and add its row to README's flag table. Nothing else:
tests/test_settings.py checks that the parser, the environment and README follow.
"""

from app.config.declare import Setting, every_setting, setting
from app.config.model import MIB, TOOL_CALL_PARSERS, ModelSettings, ToolCallParser
from app.config.profiles import PROFILES, Profile, profile_with
from app.config.settings import (
    CONCERNS,
    LOG_LEVELS,
    MIN_REASONING_KEY,
    AccessSettings,
    HttpSettings,
    LogFormat,
    LogSettings,
    SchedulingSettings,
    ServerConfig,
    StoreSettings,
)
from app.config.values import ConfigError, check_redis_url, launch_rank

__all__ = [
    "CONCERNS",
    "LOG_LEVELS",
    "MIB",
    "MIN_REASONING_KEY",
    "PROFILES",
    "TOOL_CALL_PARSERS",
    "AccessSettings",
    "ConfigError",
    "HttpSettings",
    "LogFormat",
    "LogSettings",
    "ModelSettings",
    "Profile",
    "SchedulingSettings",
    "ServerConfig",
    "Setting",
    "StoreSettings",
    "ToolCallParser",
    "check_redis_url",
    "every_setting",
    "launch_rank",
    "profile_with",
    "setting",
]
