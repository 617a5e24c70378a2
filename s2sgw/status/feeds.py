"""One revocation feed per responder that has one, following the ``[status]`` in force."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from cryptography import x509
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.application.service import MultiService

from s2sgw.config import StatusConfig
from s2sgw.status.feed import FeedSubscriber
from s2sgw.status.responders import feed_urls
from s2sgw.wire.feed import FeedDocument


@attrs.define(eq=False)
class FeedFollowers(MultiService):
    """A :class:`FeedSubscriber` for each responder's feed; :meth:`configure` adds and stops them
    when a reload changes the responders (an unchanged feed keeps its subscriber and position)."""

    reactor: Any
    issuers: Callable[[], Sequence[x509.Certificate]]
    on_revocations: Callable[[FeedDocument], object]
    registry: CollectorRegistry = REGISTRY
    subscribers: dict[tuple[bytes | None, tuple[str, ...]], FeedSubscriber] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)

    def configure(self, config: StatusConfig) -> None:
        wanted = [(r.fingerprint, feed_urls(r, config.mode)) for r in config.responders]
        wanted = [key for key in wanted if key[1]]
        for key in [key for key in self.subscribers if key not in wanted]:
            self.subscribers.pop(key).disownServiceParent()
        for key in wanted:
            if key not in self.subscribers:
                subscriber = FeedSubscriber(
                    key[1], self.reactor, issuers=self.issuers, on_revocations=self.on_revocations,
                    registry=self.registry,
                )
                self.subscribers[key] = subscriber
                subscriber.setServiceParent(self)

    def status(self) -> dict[str, Any] | None:
        """The ``revocation_feed`` field of ``/status``: the one feed's status, or ``feeds``: one per responder."""
        feeds = [dict(subscriber.status(), root=None if key[0] is None else key[0].hex())
                 for key, subscriber in self.subscribers.items()]
        if not feeds:
            return None
        return feeds[0] if len(feeds) == 1 else {"feeds": feeds}
