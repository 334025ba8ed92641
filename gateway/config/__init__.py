"""One validated configuration object, read from a TOML file at start-up.

Every key is declared once, on the dataclass field it fills (name, type, default, bounds and a
one-line doc); one reader reads them all, and every error names the key it is about
(``sources[1].format: must be one of event-stream, journey, web-push``). The example file and
docs/configuration.md (``python -m gateway.config``) are tested against the same declarations.
Secrets are never in the file: the file names environment variables, and the values are held
in :class:`Secret`, whose ``repr`` and ``str`` never show them.
"""

from gateway.config._checks import MAPPABLE_FIELDS, USER_HEADER_FIELDS
from gateway.config._model import (
    CHANNELS,
    MIN_SECRET_CHARS,
    RECORD_HEADROOM_BYTES,
    SOURCE_FORMATS,
    AllowlistConfig,
    Config,
    DedupeConfig,
    KafkaConfig,
    OneSignalApp,
    OneSignalConfig,
    Secret,
    ServerConfig,
    SourceConfig,
    SpoolConfig,
    TagRule,
    TagSyncConfig,
    TopicsConfig,
    TracingConfig,
)
from gateway.config._parse import load_config, parse_config, read_api_key, secret_by_default
from gateway.config._schema import ConfigError

__all__ = [
    "CHANNELS",
    "MAPPABLE_FIELDS",
    "MIN_SECRET_CHARS",
    "RECORD_HEADROOM_BYTES",
    "SOURCE_FORMATS",
    "USER_HEADER_FIELDS",
    "AllowlistConfig",
    "Config",
    "ConfigError",
    "DedupeConfig",
    "KafkaConfig",
    "OneSignalApp",
    "OneSignalConfig",
    "Secret",
    "ServerConfig",
    "SourceConfig",
    "SpoolConfig",
    "TagRule",
    "TagSyncConfig",
    "TopicsConfig",
    "TracingConfig",
    "load_config",
    "parse_config",
    "read_api_key",
    "secret_by_default",
]
