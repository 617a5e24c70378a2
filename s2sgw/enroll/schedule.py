"""When to renew a certificate and when to retry a failed renewal: pure arithmetic, and the
per-service state that ``/status`` and the metrics read."""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

JITTER = 0.05  # ± this fraction of the lifetime
FIRST_RETRY, MAX_RETRY = 1.0, 300.0  # seconds: back-off after a failed renewal
LAST_TENTH = 0.1  # unready when this little lifetime is left and renewal keeps failing
RESULTS = ("ok", "refused", "failed")


def renewal_time(
    not_before: float, not_after: float, renew_at: float, spread: float, issued_at: float | None = None
) -> float:
    """When to renew a certificate valid from ``not_before`` to ``not_after`` (clock seconds).

    The lifetime counts from issuance (``issued_at`` when known: a CA may backdate
    ``not_before``). ``spread`` in [-1, 1] picks the jitter; the result is never before issuance
    and always leaves 2 % of the lifetime before expiry.
    """
    start = max(not_before, issued_at) if issued_at is not None else not_before
    lifetime = max(0.0, not_after - start)
    at = start + renew_at * lifetime + max(-1.0, min(1.0, spread)) * JITTER * lifetime
    return max(start, min(at, not_after - 0.02 * lifetime))


def retry_delay(failures: int, remaining: float, first: float = FIRST_RETRY, cap: float = MAX_RETRY) -> float:
    """Seconds before retrying after ``failures`` failures in a row: ``first`` doubling up to ``cap``,
    and at most half the ``remaining`` lifetime (never below ``first``) so retries land before expiry."""
    delay = min(cap, first * 2 ** min(max(failures, 1) - 1, 32))
    if remaining > 0:
        delay = min(delay, max(first, remaining / 2))
    return delay


@attrs.define(eq=False)
class ServiceRenewal:
    """One service's renewal state: what ``/status`` and the metrics show."""

    name: str
    next_at: float | None = None
    last_result: str | None = None
    last_at: float | None = None
    last_error: str | None = None
    failures: int = 0  # in a row
    issued_at: float | None = None  # when this process received the current certificate
    serial: int | None = None  # of the certificate the timer was armed for
    counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(RESULTS, 0))
    warned: bool = False
    timer: IDelayedCall | None = None
    running: Deferred | None = None
