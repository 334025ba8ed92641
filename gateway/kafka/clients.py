"""kafka-python clients made so that a failed start leaves nothing running.

kafka-python 3's admin client and consumer start their IO thread before they bootstrap. When
no broker answers, the constructor raises and that thread stays, retrying metadata (and logging
"No node available") until the process ends, with its sockets: the gateway's topic watcher,
which makes an admin client at every check, left one such thread per check for as long as
Kafka was away. :func:`start_client` closes what a failed constructor had started; every admin
client and consumer the gateway makes goes through it (kafka-python's producer cleans up
after itself).
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

__all__ = ["start_client"]

C = TypeVar("C")


def start_client(cls: type[C], **options: Any) -> C:
    """``cls(**options)``; if that raises, the half-made client is closed first."""
    client = cls.__new__(cls)
    try:
        client.__init__(**options)  # type: ignore[misc]
    except BaseException:
        _close_unstarted(client)
        raise
    return client


def _close_unstarted(client: Any) -> None:
    # close() returns early until the constructor's last step has set ``_closed``. What the
    # admin client's close does (metrics, network client, IO loop) is done here step by step,
    # each on its own: one the constructor had not made yet must not keep the others open
    for part, method in (("_metrics", "close"), ("_client", "close"), ("_net", "stop")):
        stop = getattr(getattr(client, part, None), method, None)
        if callable(stop):
            with contextlib.suppress(Exception):
                stop()
