"""``python -m gateway.tagsync --config FILE [--dry-run]``: run the tag-sync worker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import orjson

from gateway.config import ConfigError, load_config

from .worker import run_tag_sync

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the record's ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway tag-sync",
        description="Write tags derived from normalized OneSignal events back to OneSignal users.",
    )
    parser.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG"), help="TOML config")
    parser.add_argument("--dry-run", action="store_true", help="print the PATCHes, send nothing")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if not args.config:
        parser.error("--config FILE (or GATEWAY_CONFIG) is required")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_tag_sync(config, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
