"""OCSP for several issuing CAs at once: the current one and those it replaced, until retired.

During an intermediate rotation leaves of the old and the new issuing CA are both in use; each
query is answered by the :class:`~s2sgw.ca.ocsp.Responder` of the issuer its CertID names,
signed by that issuer's own delegated signer (RFC 6960 4.2.2.2: the signer must be issued by
the CA that issued the certificate in question).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import attrs
from cryptography import x509

from s2sgw.ca.ocsp import UNAUTHORIZED_ANSWER, Answer, Query, Responder, SerialStatus


@attrs.define(eq=False)
class Responders:
    """Looks like one Responder (what the publisher drives); the first member is the current CA."""

    members: Sequence[Responder]

    def __attrs_post_init__(self) -> None:
        if not self.members:
            raise ValueError("at least one responder")
        self.members = tuple(self.members)

    # The current issuing CA's: what the feed, the metrics and cache headers speak of.
    @property
    def issuer(self) -> x509.Certificate:
        return self.members[0].issuer

    @property
    def signer_cert(self) -> x509.Certificate:
        return self.members[0].signer_cert

    @property
    def signer_key(self):  # noqa: ANN201 - the signer's private key type
        return self.members[0].signer_key

    @property
    def validity(self) -> datetime.timedelta:
        return self.members[0].validity

    @property
    def signatures(self) -> int:
        return sum(member.signatures for member in self.members)

    def __len__(self) -> int:
        return sum(len(member) for member in self.members)

    def parse(self, body: bytes) -> Query | Answer:
        parsed = self.members[0].parse(body)
        if parsed is UNAUTHORIZED_ANSWER:
            for member in self.members[1:]:
                other = member.parse(body)
                if isinstance(other, Query):
                    return other
        return parsed

    def replace_signer(self, index: int, cert: x509.Certificate, key: object) -> int:
        """The member for ``ca.issuers[index]`` signs with a renewed signer from now on."""
        return self.members[index].replace_signer(cert, key)  # type: ignore[arg-type]

    def _for(self, query: Query) -> Responder:
        for member in self.members:
            if member.answers(query):
                return member
        return self.members[0]  # cannot happen: parse() handed out only queries a member took

    def cached(self, query: Query, now: datetime.datetime) -> Answer | None:
        return self._for(query).cached(query, now)

    def respond(self, query: Query, status: SerialStatus, now: datetime.datetime, *, cache: bool = True) -> Answer:
        return self._for(query).respond(query, status, now, cache=cache)

    def update(self, serial: int, status: SerialStatus, now: datetime.datetime) -> int:
        return sum(member.update(serial, status, now) for member in self.members)

    def forget_unknown(self) -> int:
        return sum(member.forget_unknown() for member in self.members)

    def refresh(self, now: datetime.datetime, *, lead: float = 0.2, budget: int = 1000) -> int:
        return sum(member.refresh(now, lead=lead, budget=budget) for member in self.members)


def responders_for(ca: object, validity: datetime.timedelta) -> Responders:
    """A Responder for each issuing CA of ``ca`` (a CertificateAuthority), the current one first."""
    return Responders(
        [
            Responder(issuer=issuing.cert, signer_cert=issuing.ocsp_cert, signer_key=issuing.ocsp_key, validity=validity)
            for issuing in ca.issuers  # type: ignore[attr-defined]
        ]
    )
