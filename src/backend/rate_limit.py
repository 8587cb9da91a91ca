"""A destination's optional rate limits (messages and bytes per second), so
that a station catching up after a long outage does not flood a shared uplink
or the broker: token buckets holding at most one second's worth. Used by the
drain loop only."""

from __future__ import annotations

import time


class TokenBucket:
    """`per_second` tokens a second, at most one second's worth saved up; no
    limit when `per_second` is None."""

    def __init__(self, per_second: float | None) -> None:
        """Start full."""
        self.per_second = per_second
        self.tokens = per_second or 0.0
        self.refilled = time.monotonic()

    def _refill(self) -> None:
        if self.per_second is None:
            return
        now = time.monotonic()
        self.tokens = min(self.per_second, self.tokens + (now - self.refilled) * self.per_second)
        self.refilled = now

    def allows(self, amount: float) -> bool:
        """Whether `amount` may go now (a single amount larger than a second's
        worth goes once the bucket is full, or it would never go)."""
        if self.per_second is None:
            return True
        self._refill()
        return self.tokens >= min(amount, self.per_second)

    def spend(self, amount: float) -> None:
        """Take `amount` out (the bucket may go below zero: later sends wait)."""
        if self.per_second is not None:
            self._refill()
            self.tokens -= amount

    def seconds_until(self, amount: float) -> float:
        """How long until `allows(amount)`."""
        if self.per_second is None:
            return 0.0
        self._refill()
        missing = min(amount, self.per_second) - self.tokens
        return max(0.0, missing / self.per_second)
