"""The one start-up path of every command: the config, its secrets, the logs.

``gateway serve``, ``gateway tag-sync``, the other subcommands, ``python -m gateway.tagsync``,
the uvicorn worker processes, the tests and the benchmark all start here, so a secret the
config resolved is registered with the log scrubber before the first line is logged.
"""

from __future__ import annotations

import os

from gateway.config import Config, load_config
from gateway.logs import configure_logging, register_secrets
from gateway.tracing import header_values

__all__ = ["resolved_secrets", "start"]


def resolved_secrets(cfg: Config) -> list[str]:
    """Every secret value the config resolved: source secrets, API keys, the SASL password."""
    secrets = [s.reveal() for src in cfg.sources for s in src.secrets]
    secrets += [a.api_key.reveal() for a in cfg.onesignal.apps if a.api_key]
    if cfg.kafka.sasl_password:
        secrets.append(cfg.kafka.sasl_password.reveal())
    if cfg.tracing.headers_env:
        # the exporter's headers carry credentials (an API key for the trace backend)
        text = os.environ.get(cfg.tracing.headers_env, "")
        secrets += header_values(text)
    return [s for s in secrets if s]


def start(path: str, *, log_level: str | None = None) -> Config:
    """Load and validate ``path``, register its secrets, then log JSON lines to stderr."""
    cfg = load_config(path)
    register_secrets(resolved_secrets(cfg))
    configure_logging(log_level or cfg.server.log_level)
    return cfg
