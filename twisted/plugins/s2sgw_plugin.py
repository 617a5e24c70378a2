"""twistd plugins: ``twistd s2sgw`` (the gateway) and ``twistd s2sgw-ca`` (the CA status server)."""

from twisted.application.service import ServiceMaker

s2sgw_gateway = ServiceMaker(
    "s2sgw",
    "s2sgw.tap",
    "mTLS gateway: per-service listeners and connectors with identity and status checks",
    "s2sgw",
)

s2sgw_ca = ServiceMaker(
    "s2sgw-ca",
    "s2sgw.ca.tap",
    "Certificate authority status server: OCSP responder, CRL and trust bundle",
    "s2sgw-ca",
)
