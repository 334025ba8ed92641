"""The ``gateway`` command: serve, tag-sync, demo, check-config, topics, ranges, replay, spool,
schema."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from gateway import __version__
from gateway.config import Config, ConfigError
from gateway.ingress import allowlist as ranges_mod
from gateway.startup import start

__all__ = ["main"]

GOOGLE_CLOUD_JSON = "https://www.gstatic.com/ipranges/cloud.json"


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get("GATEWAY_CONFIG")
    if not path:
        raise ConfigError("", "no config file: pass --config FILE or set GATEWAY_CONFIG")
    return path


def _load(args: argparse.Namespace) -> Config:
    return start(_config_path(args))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.ingress.app import create_app
    from gateway.ingress.server import GatewayServer, uvicorn_config, uvicorn_options

    cfg = _load(args)
    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if cfg.server.workers > 1:
        import shutil
        import tempfile

        from gateway.ingress.peers import ENV_DIR

        # worker processes build their own app from the same file (see server.worker_app),
        # and meet in a private directory so that one scrape answers for all of them
        os.environ["GATEWAY_CONFIG"] = os.path.abspath(cfg.path)
        os.environ[ENV_DIR] = tempfile.mkdtemp(prefix="gateway-metrics-")
        try:
            uvicorn.run(
                "gateway.ingress.server:worker_app",
                factory=True,
                **uvicorn_options(cfg, **overrides),
            )
        finally:
            shutil.rmtree(os.environ.pop(ENV_DIR), ignore_errors=True)
        return 0
    app = create_app(cfg)
    server = GatewayServer(uvicorn_config(app, cfg, **overrides))
    server.run()
    return 0


def cmd_tag_sync(args: argparse.Namespace) -> int:
    from gateway.tagsync.worker import run_tag_sync

    cfg = _load(args)
    return run_tag_sync(cfg, dry_run=args.dry_run)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.devkit.demo import run_demo

    return asyncio.run(run_demo(events=args.events, show=args.show))


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.ops.check_config import check_config

    cfg = _load(args)
    return check_config(cfg, online=args.online, out=sys.stdout)


def cmd_topics(args: argparse.Namespace) -> int:
    from gateway.kafka.topics import create_topics
    from gateway.ops.check_config import bootstrap_reachable

    cfg = _load(args)
    if not bootstrap_reachable(cfg.kafka.bootstrap_servers, timeout_s=5.0):
        print(f"kafka {cfg.kafka.bootstrap_servers}: no bootstrap server answers", file=sys.stderr)
        return 1
    return create_topics(cfg, dry_run=args.action == "plan", out=sys.stdout)


SCHEMAS = ("event", "binary-headers", "structured", "dead-letter", "asyncapi")


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from gateway.config import parse_config, secret_by_default
    from gateway.core import schema

    if args.which == "asyncapi":
        import tomllib

        from gateway.ops.asyncapi import asyncapi_document

        data: dict[str, object] = {}
        if args.config or os.environ.get("GATEWAY_CONFIG"):
            with open(_config_path(args), "rb") as f:
                data = tomllib.load(f)
        # only [kafka], [topics] and whether a source has no secret name the topics: nothing
        # needs to be set in the environment for this
        sources = data.get("sources", [])
        open_source = isinstance(sources, list) and any(
            isinstance(s, dict)
            and not s.get("require_secret", secret_by_default(str(s.get("format", ""))))
            for s in sources
        )
        doc = asyncapi_document(
            parse_config({k: data[k] for k in ("kafka", "topics") if k in data}),
            unauthenticated=open_source,
        )
    else:
        make = {
            "event": schema.event_schema,
            "binary-headers": schema.binary_headers_schema,
            "structured": schema.structured_schema,
            "dead-letter": schema.dead_letter_headers_schema,
        }[args.which]
        doc = make(strict=args.strict)
    print(json.dumps(doc, indent=2, ensure_ascii=False))
    return 0


def cmd_ranges(args: argparse.Namespace) -> int:
    from gateway.ingress import allowlist as ranges

    scopes = tuple(args.scope) if args.scope else None
    snapshot_path = args.snapshot
    if args.config or os.environ.get("GATEWAY_CONFIG"):
        cfg = _load(args)
        scopes = scopes or cfg.allowlist.scopes
        snapshot_path = snapshot_path or cfg.allowlist.snapshot
    scopes = scopes or ("europe-west4",)
    # the target of an update may not exist yet: then the diff is against the bundled snapshot
    existing = snapshot_path if snapshot_path and os.path.exists(snapshot_path) else None
    if args.action == "show" and snapshot_path and not existing:
        print(f"ranges show: {snapshot_path} does not exist", file=sys.stderr)
        return 2
    current = ranges.load_snapshot(existing, scopes)
    if args.action == "show":
        print(f"snapshot: {snapshot_path or '(bundled)'}")
        print(f"syncToken: {current.sync_token}  creationTime: {current.creation_time}")
        made = ranges.data_time(current)
        if made is not None:
            print(f"age: {(time.time() - made) / 86400:.1f} days")
        print(f"scopes: {', '.join(scopes)}  prefixes: {len(current.cidrs)}")
        for cidr in current.cidrs:
            print(f"  {cidr}")
        if args.onesignal:
            print(f"OneSignal's published list ({len(ranges.ONESIGNAL_PUBLISHED)}):")
            for cidr in ranges.ONESIGNAL_PUBLISHED:
                print(f"  {cidr}")
        return 0
    # update
    if not snapshot_path:
        print(
            "ranges update: pass --snapshot FILE (or allowlist.snapshot in the config) to say "
            "where the new snapshot goes; the bundled one is read-only",
            file=sys.stderr,
        )
        return 2
    progress = _DownloadProgress(sys.stderr)
    try:
        new = asyncio.run(_download(args.url, scopes, progress))
    finally:
        progress.close()
    added, removed = ranges.diff(current, new)
    for cidr in added:
        print(f"+ {cidr}")
    for cidr in removed:
        print(f"- {cidr}")
    print(
        f"{len(added)} added, {len(removed)} removed; "
        f"syncToken {current.sync_token} -> {new.sync_token}"
    )
    if args.dry_run:
        return 0
    ranges.write_snapshot(snapshot_path, new)
    print(f"wrote {snapshot_path} ({len(new.cidrs)} prefixes)")
    return 0


class _DownloadProgress:
    """Bytes downloaded so far, redrawn on one stderr line; silent unless stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.enabled = stream.isatty()
        self.drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        of = f" of {total / 1000:.0f} kB" if total else ""
        self.stream.write(f"\rdownloading cloud.json: {done / 1000:.0f} kB{of}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


async def _download(
    url: str, scopes: Sequence[str], progress: _DownloadProgress | None = None
) -> ranges_mod.RangeSnapshot:
    import httpx

    async with httpx.AsyncClient(timeout=60.0, follow_redirects=True) as client:
        data = await ranges_mod.fetch_cloud_json(client, url, progress=progress)
    return ranges_mod.parse_cloud_json(data, scopes)


def cmd_replay(args: argparse.Namespace) -> int:
    from gateway.ops import replay

    cfg = _load(args)
    report = replay.run_replay(
        cfg,
        topic=args.topic,
        group=args.group,
        from_beginning=args.from_beginning,
        limit=args.limit,
        dry_run=args.dry_run,
        requeue=args.requeue,
    )
    replay.print_report(report, sys.stdout)
    return replay.exit_code(report)


def cmd_spool(args: argparse.Namespace) -> int:
    from gateway.ops import spool

    cfg = _load(args)
    if args.action == "status":
        return spool.spool_status(cfg, sys.stdout, as_json=args.json)
    if args.action == "check":
        return spool.spool_check(cfg, sys.stdout)
    return spool.spool_drain(cfg, sys.stdout, timeout_s=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="OneSignal webhooks and Event Streams into Kafka; derived tags back to users.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="TOML config file (default: $GATEWAY_CONFIG)")

    p = sub.add_parser("serve", help="run the HTTP ingress")
    with_config(p)
    p.add_argument("--host", help="override server.host")
    p.add_argument("--port", type=int, help="override server.port")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tag-sync", help="run the tag-sync worker")
    with_config(p)
    p.add_argument(
        "--dry-run", action="store_true", help="print the updates instead of sending them"
    )
    p.set_defaults(func=cmd_tag_sync)

    p = sub.add_parser("demo", help="everything on an embedded broker, with sample events")
    p.add_argument("--events", type=int, default=2000, help="events in the throughput burst")
    p.add_argument("--show", type=int, default=3, help="records to print in full")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("check-config", help="validate a config file and try its connections")
    with_config(p)
    p.add_argument("--online", action="store_true", help="also try the OneSignal API keys")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "topics", help="create the gateway's Kafka topics with the [topics] settings, or plan it"
    )
    p.add_argument(
        "action",
        choices=["create", "plan"],
        help="create: make the missing topics; plan: say what create would do",
    )
    with_config(p)
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser(
        "schema",
        help="print the records' JSON Schema (draft 2020-12) or the topics' AsyncAPI document",
    )
    p.add_argument("which", choices=SCHEMAS, nargs="?", default="event")
    p.add_argument(
        "--strict",
        action="store_true",
        help="no field the gateway does not document (what its own tests check); the default "
        "is open to later minor versions",
    )
    with_config(p)
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("ranges", help="show or update the sender allowlist snapshot")
    p.add_argument("action", choices=["show", "update"])
    with_config(p)
    p.add_argument("--snapshot", help="snapshot file (default: allowlist.snapshot, else bundled)")
    p.add_argument("--scope", action="append", help="cloud.json scope (repeatable)")
    p.add_argument("--url", default=GOOGLE_CLOUD_JSON, help="where to download cloud.json from")
    p.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    p.add_argument(
        "--onesignal", action="store_true", help="also list OneSignal's published ranges"
    )
    p.set_defaults(func=cmd_ranges)

    p = sub.add_parser(
        "replay", help="publish the ingress dead-letter topic again through the current config"
    )
    with_config(p)
    p.add_argument("--topic", help="dead-letter topic (default: kafka.dead_letter_topic)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--from-beginning",
        action="store_true",
        help="read every record from the start; use and commit no group offsets",
    )
    start.add_argument("--group", help="consumer group (default: <dead-letter topic>.replay)")
    p.add_argument("--limit", type=_positive, help="replay at most N records")
    p.add_argument(
        "--dry-run", action="store_true", help="report what would be published; publish nothing"
    )
    p.add_argument(
        "--requeue",
        action="store_true",
        help="append records that still fail to the dead-letter topic again",
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("spool", help="the local spool: show it, verify it, or deliver it and exit")
    p.add_argument(
        "action",
        choices=["status", "check", "drain"],
        help="status: records, bytes, oldest age, keys waiting; check: verify every checksum"
        " (exit 1 on damage); drain: deliver to Kafka and exit (the gateway must be stopped)",
    )
    with_config(p)
    p.add_argument("--json", action="store_true", help="status as one JSON object")
    p.add_argument(
        "--timeout", type=float, default=600.0, help="drain: give up after this many seconds"
    )
    p.set_defaults(func=cmd_spool)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
