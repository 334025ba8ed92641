"""Tag sync: derive OneSignal user tags from normalized events in Kafka and write them back."""

from gateway.tagsync.client import DryRunSender, OneSignalClient, Response, update_body, update_url
from gateway.tagsync.coalesce import Batch, Coalescer, OffsetTracker, SourceRef
from gateway.tagsync.ratelimit import (
    AppLimiter,
    UserLimiter,
    backoff_delay,
    classify,
    parse_retry_after,
)
from gateway.tagsync.rules import Alias, Derivation, compile_rules, derive, resolve_alias
from gateway.tagsync.worker import TagSyncWorker, run_tag_sync

__all__ = [
    "Alias",
    "AppLimiter",
    "Batch",
    "Coalescer",
    "Derivation",
    "DryRunSender",
    "OffsetTracker",
    "OneSignalClient",
    "Response",
    "SourceRef",
    "TagSyncWorker",
    "UserLimiter",
    "backoff_delay",
    "classify",
    "compile_rules",
    "derive",
    "parse_retry_after",
    "resolve_alias",
    "run_tag_sync",
    "update_body",
    "update_url",
]
