"""``python -m gateway.tagsync --config FILE [--dry-run]``: run the tag-sync worker.

The same start-up as ``gateway tag-sync`` (gateway/startup.py): secrets registered with the
log scrubber, the gateway's JSON log lines.
"""

from __future__ import annotations

import argparse
import os
import sys

from gateway.config import ConfigError
from gateway.startup import start
from gateway.tagsync.worker import run_tag_sync


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gateway tag-sync",
        description="Write tags derived from normalized OneSignal events back to OneSignal users.",
    )
    parser.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG"), help="TOML config")
    parser.add_argument("--dry-run", action="store_true", help="print the PATCHes, send nothing")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config FILE (or GATEWAY_CONFIG) is required")
    try:
        config = start(args.config, log_level=args.log_level)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_tag_sync(config, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
