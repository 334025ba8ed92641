"""Which :class:`~.client.UpdateSender` the worker sends through.

The lean HTTP/1.1 client (:mod:`.http1`) by default; httpx when asked
(``tag_sync.http_client = "httpx"``) or when an environment proxy applies to the API URL,
since httpx speaks to proxies (CONNECT for https) and the lean client does not; a dry run
prints the requests instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TextIO

from gateway.config import Config, Secret
from gateway.tagsync.client import DryRunSender, OneSignalClient, UpdateSender, env_proxy_for
from gateway.tagsync.http1 import Http1Client

__all__ = ["make_sender"]

log = logging.getLogger("gateway.tagsync.worker")


def make_sender(
    config: Config, keys: Mapping[str, Secret], *, dry_run: bool = False, out: TextIO | None = None
) -> UpdateSender:
    """A sender for ``config``'s API URL with the apps' ``keys`` (re-set later through
    :meth:`~.client.UpdateSender.set_api_key` when a key changes)."""
    ts = config.tag_sync
    api_url = config.onesignal.api_url
    if dry_run:
        return DryRunSender(api_url, delete_value=ts.delete_value, out=out)
    proxy = env_proxy_for(api_url)
    if ts.http_client == "httpx" or proxy is not None:
        if proxy is not None:
            log.info("an environment proxy applies to onesignal.api_url: using httpx")
        return OneSignalClient(
            api_url,
            keys,
            timeout_s=config.onesignal.timeout_s,
            max_connections=ts.max_concurrency,
            delete_value=ts.delete_value,
        )
    return Http1Client(
        api_url,
        keys,
        timeout_s=config.onesignal.timeout_s,
        max_connections=ts.max_concurrency,
        delete_value=ts.delete_value,
    )
