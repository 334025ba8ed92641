"""Helpers for ingress tests: a real uvicorn server on loopback in front of a real broker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import orjson

from gateway.config import Config, parse_config
from gateway.ingress.app import create_app
from gateway.ingress.server import ServerThread, free_port
from gateway.metrics import IngressMetrics

from .conftest import API_VERSION

SECRET = "s3cret-event-stream-0123456789abcdef"
ROTATED = "s3cret-next-fedcba9876543210"
EU_WEST4 = "34.90.12.34"  # inside OneSignal's published europe-west4 ranges
EU_WEST4_V6 = "2600:1900:4060::1234"


def gateway_config(bootstrap: str, prefix: str, **sections: Mapping[str, Any]) -> Config:
    data: dict[str, Any] = {
        # the metrics port on loopback, a free one per gateway (scrape() reads it)
        "server": {"trusted_proxies": ["127.0.0.1/32", "::1/128"], "metrics_port": free_port()},
        # refresh is on by default and would go to gstatic.com: tests never leave loopback
        "allowlist": {"refresh_interval_s": 0},
        "kafka": {
            "bootstrap_servers": bootstrap,
            "api_version": API_VERSION,
            "topic": f"{prefix}.{{channel}}",
            "dead_letter_topic": f"{prefix}.dlt",
            "unauthenticated_topic": f"{prefix}.unauthenticated",
            "ack_timeout_s": 3.0,
        },
        "sources": [
            {
                "name": "event-stream",
                "path": "/v1/onesignal/events",
                "format": "event-stream",
                "secrets_env": "T_SECRETS",
            },
            {
                "name": "journey",
                "path": "/v1/onesignal/journey",
                "format": "journey",
                "secrets_env": "T_SECRETS",
            },
            {
                "name": "web-push",
                "path": "/v1/onesignal/web-push",
                "format": "web-push",
                "app_id": "11111111-2222-3333-4444-555555555555",
                "cors_origins": ["https://shop.example"],
            },
        ],
    }
    for name, values in sections.items():
        if isinstance(data.get(name), dict):
            data[name] = {**data[name], **values}
        else:
            data[name] = values
    return parse_config(data, env={"T_SECRETS": f"{SECRET},{ROTATED}"})


@contextlib.contextmanager
def running_gateway(
    config: Config, host: str = "127.0.0.1"
) -> Iterator[tuple[str, IngressMetrics]]:
    metrics = IngressMetrics(process=False)
    app = create_app(config, metrics=metrics)
    server = ServerThread(app, config, host=host)
    with server.running():
        wait_ready(server.url)
        yield server.url, metrics


def operator_url(config: Config) -> str:
    """Where the gateway serves /metrics and /openapi.json (server.metrics_host/port)."""
    s = config.server
    host = f"[{s.metrics_host}]" if ":" in s.metrics_host else s.metrics_host
    return f"http://{host}:{s.metrics_port}"


def scrape(config: Config) -> str:
    """The gateway's /metrics, from its metrics port."""
    text: str = httpx.get(f"{operator_url(config)}/metrics", timeout=10).text
    return text


def wait_ready(url: str, timeout_s: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/readyz", timeout=2)
            if last.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not ready: {last.text if last else 'no answer'}")


def post(
    client: httpx.Client,
    path: str,
    payload: Any = None,
    *,
    content: bytes | None = None,
    secret: str | None = SECRET,
    xff: str | None = EU_WEST4,
    headers: list[tuple[str, str]] | None = None,
    content_type: str = "application/json",
) -> httpx.Response:
    hdrs: list[tuple[str, str]] = [("content-type", content_type)]
    if secret is not None:
        hdrs.append(("authorization", f"Bearer {secret}"))
    if xff is not None:
        hdrs.append(("x-forwarded-for", xff))
    hdrs.extend(headers or [])
    body = content if content is not None else orjson.dumps(payload)
    return client.post(path, content=body, headers=hdrs)
