"""The channel's retry policy: gRPC's own, in the service config, honouring server pushback."""

from __future__ import annotations

from typing import Any

DEFAULT_RETRIES = 3
"""Retries after the first attempt: 4 attempts in all."""

MAX_RETRIES = 4
"""gRPC makes at most 5 attempts of a call, whatever the service config says."""

SERVICE = "gradtap.v1.GradientService"

RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
"""A replica that is down or draining, and a server at capacity. Every other code would fail
again: the server marks its RESOURCE_EXHAUSTED for requests that are too large with a
negative pushback, which gRPC takes as "do not retry"."""


def check_retries(retries: int) -> int:
    """`retries` when it is 0 to MAX_RETRIES; raises ValueError otherwise."""
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, not {type(retries).__name__}")
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be 0 to {MAX_RETRIES}: gRPC makes at most 5 attempts")
    return retries


def method_config(retries: int) -> list[dict[str, Any]]:
    """The service config's methodConfig for GradientService; empty for no retries.

    gRPC waits a random time up to initialBackoff, then up to 2x, 4x ... capped at maxBackoff,
    before each retry, unless the server's `grpc-retry-pushback-ms` trailer says when. It
    retries a streaming call only until the first response message has arrived, so a result
    is never stitched from two attempts.
    """
    if check_retries(retries) == 0:
        return []
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    return [{"name": [{"service": SERVICE}], "retryPolicy": policy}]
