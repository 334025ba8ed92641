"""What the delivery side needs from ``[tag_sync]`` and ``[onesignal]``, in one frozen object."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import TagSyncConfig

__all__ = ["DeliverySettings"]


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    flush_interval_s: float
    max_keys: int
    per_user_interval_s: float
    app_rate_limit: float
    max_concurrency: int
    max_attempts: int
    backoff_base_s: float
    backoff_cap_s: float
    max_retry_elapsed_s: float
    dead_letter_topic: str
    delete_value: str
    api_url: str
    auth_retry_s: float = 30.0

    @classmethod
    def from_config(cls, ts: TagSyncConfig, api_url: str) -> DeliverySettings:
        return cls(
            flush_interval_s=ts.flush_interval_s,
            max_keys=ts.max_keys_per_request,
            per_user_interval_s=ts.per_user_interval_s,
            app_rate_limit=ts.app_rate_limit,
            max_concurrency=ts.max_concurrency,
            max_attempts=ts.max_attempts,
            backoff_base_s=ts.backoff_base_s,
            backoff_cap_s=ts.backoff_cap_s,
            max_retry_elapsed_s=ts.max_retry_elapsed_s,
            dead_letter_topic=ts.dead_letter_topic,
            delete_value=ts.delete_value,
            api_url=api_url,
            auth_retry_s=ts.auth_retry_s,
        )
