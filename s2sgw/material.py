"""TLS material as loaded from disk: each service's chain and key, the trust bundle, the CRLs.

Loading checks everything a gateway needs before it may serve with it (chains verify against the
bundle, keys match, nothing expired, CRLs signed by a CA of the bundle); the trust store swaps a
whole new set in, or keeps the old one."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL

from s2sgw import handshake, pki, tls
from s2sgw.config import (
    ConfigError,
    GatewayConfig,
    ServiceConfig,
)
from s2sgw.status.stapling import StapleCache, stapling_enabled
from s2sgw.wire import est

_SHA256 = hashes.SHA256()


@attrs.frozen
class ServiceMaterial:
    """One service's identity and the contexts built from it."""

    name: str
    chain: tuple[x509.Certificate, ...]
    key: pki.PrivateKey = attrs.field(repr=False)
    server_context: SSL.Context = attrs.field(repr=False)
    client_context: SSL.Context = attrs.field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def spiffe_id(self) -> str | None:
        return pki.spiffe_id(self.leaf)



@attrs.frozen
class TrustMaterial:
    """A complete, checked snapshot of everything TLS needs."""

    generation: int
    config: GatewayConfig
    roots: tuple[x509.Certificate, ...]
    services: Mapping[str, ServiceMaterial]
    trust_domain: str | None
    loaded_at: datetime.datetime
    crl: x509.CertificateRevocationList | None = None  # the CRL of the CA issuing the leaves
    crls: tuple[x509.CertificateRevocationList, ...] = ()  # every CRL held, ``crl`` included

    @property
    def other_crls(self) -> tuple[x509.CertificateRevocationList, ...]:
        """The CRLs beside ``crl``, such as the root's revoking intermediates."""
        return tuple(crl for crl in self.crls if crl is not self.crl)

    def crl_of(self, issuer: x509.Name) -> x509.CertificateRevocationList | None:
        """The held CRL issued by ``issuer``, if any (one per issuer)."""
        held = self.crls or ((self.crl,) if self.crl is not None else ())
        return next((crl for crl in held if crl.issuer == issuer), None)

    @property
    def ca_certificates(self) -> tuple[x509.Certificate, ...]:
        """Roots plus the intermediates our own chains carry: the candidate CRL and chain issuers."""
        seen: dict[bytes, x509.Certificate] = {}
        for certificate in self.roots + tuple(c for s in self.services.values() for c in s.chain[1:]):
            seen.setdefault(certificate.fingerprint(_SHA256), certificate)
        return tuple(seen.values())

    @property
    def crl_number(self) -> int | None:
        return None if self.crl is None else pki.crl_number(self.crl)



def load_material(
    config: GatewayConfig,
    now: datetime.datetime,
    generation: int,
    *,
    services: Iterable[str] | None = None,
    previous: TrustMaterial | None = None,
    staples: StapleCache | None = None,
) -> TrustMaterial:
    """Read and check every file ``config`` names, and build contexts. Blocking; raises ConfigError.

    ``services`` limits (and orders) the services loaded to those the process runs; ``previous``
    is the material being replaced, whose CRL number a new CRL must not go below. With
    ``staples`` and stapling configured, server contexts staple their answer from that cache.
    """
    try:
        return _load_material(config, now, generation, services, previous, staples)
    except ConfigError:
        raise
    except pki.PKIError as error:
        raise ConfigError(str(error)) from None
    except SSL.Error as error:
        raise ConfigError(f"{config.path}: cannot build a TLS context: {handshake.ssl_error_text(error)}") from None



def _load_material(
    config: GatewayConfig,
    now: datetime.datetime,
    generation: int,
    wanted: Iterable[str] | None,
    previous: TrustMaterial | None,
    staples: StapleCache | None = None,
) -> TrustMaterial:
    roots = tuple(pki.load_certificates(config.trust))
    for root in roots:
        if not pki.is_ca(root):
            raise ConfigError(
                f"{config.trust}: {root.subject.rfc4514_string()} is not a CA certificate (basicConstraints)"
            )
    if config.enrollment is not None and config.enrollment.fingerprint not in {est.fingerprint(r) for r in roots}:
        raise ConfigError(
            f"{config.path}: enrollment.fingerprint: no root in {config.trust} has this fingerprint; "
            "renewal would trust nothing"
        )
    by_name = {service.name: service for service in config.services}
    names = list(wanted) if wanted is not None else list(by_name)
    services: dict[str, ServiceMaterial] = {}
    domains: dict[str, str] = {}
    stapling = stapling_enabled(config)
    for name in names:
        service = by_name[name]
        material = _load_service(service, roots, now, staples if stapling else None, stapling)
        services[name] = material
        if material.spiffe_id is not None:
            domains[name] = pki.trust_domain(material.spiffe_id)
    if len(set(domains.values())) > 1:
        listed = ", ".join(f"{name}={domain}" for name, domain in domains.items())
        raise ConfigError(f"{config.path}: services belong to different SPIFFE trust domains ({listed})")
    snapshot = TrustMaterial(
        generation=generation,
        config=config,
        roots=roots,
        services=services,
        trust_domain=next(iter(domains.values()), None),
        loaded_at=now,
    )
    if config.status.mode == "crl":
        assert config.status.crl is not None
        crls = pki.load_crls(config.status.crl)
        for crl in crls:
            _check_crl(crl, snapshot, now, _crl_source(str(config.status.crl), crl, len(crls)), previous)
        snapshot = attrs.evolve(snapshot, crl=pki.primary_crl(crls, roots), crls=tuple(crls))
    return snapshot



def _load_service(
    service: ServiceConfig,
    roots: Sequence[x509.Certificate],
    now: datetime.datetime,
    staples: StapleCache | None = None,
    stapling: bool = False,
) -> ServiceMaterial:
    chain = pki.load_certificates(service.cert)
    key = pki.load_private_key(service.key)
    leaf = chain[0]
    where = f"{service.cert}"
    if not pki.key_matches_certificate(key, leaf):
        raise ConfigError(f"{service.key}: key does not match the certificate in {service.cert}")
    problem = pki.validity_problem(leaf, now)
    if problem is not None:
        raise ConfigError(f"{where}: certificate {problem}")
    if not pki.has_san(leaf):
        raise ConfigError(f"{where}: certificate has no subjectAltName; peers would refuse it")
    if pki.is_ca(leaf):
        raise ConfigError(f"{where}: the first certificate is a CA certificate, not a service leaf")
    if service.inbound and not _usage(leaf, ExtendedKeyUsageOID.SERVER_AUTH):
        raise ConfigError(f"{where}: certificate lacks extendedKeyUsage serverAuth needed for inbound routes")
    if service.outbound and not _usage(leaf, ExtendedKeyUsageOID.CLIENT_AUTH):
        raise ConfigError(f"{where}: certificate lacks extendedKeyUsage clientAuth needed for outbound routes")
    try:
        pki.verify_chain(chain, roots, now)
    except pki.PKIError as error:
        raise ConfigError(f"{where}: {error} against the trust bundle") from None
    return ServiceMaterial(
        name=service.name,
        chain=tuple(chain),
        key=key,
        server_context=tls.server_context(
            chain, key, roots, staple=staples.callback_for(leaf) if staples is not None else None
        ),
        client_context=tls.client_context(chain, key, roots, staples=stapling),
    )



def _usage(leaf: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    usages = pki.extended_key_usages(leaf)
    return usages is not None and usage in usages



def _crl_source(path: str, crl: x509.CertificateRevocationList, count: int) -> str:
    return path if count == 1 else f"{path} (CRL of {crl.issuer.rfc4514_string()})"



def _check_crl(
    crl: x509.CertificateRevocationList,
    material: TrustMaterial,
    now: datetime.datetime,
    source: str,
    previous: TrustMaterial | None,
) -> None:
    pki.check_crl(crl, material.ca_certificates, now, source)
    number = pki.crl_number(crl)
    held = previous.crl_of(crl.issuer) if previous is not None else None  # the same CA's current CRL
    old = pki.crl_number(held) if held is not None else None
    if old is not None and (number is None or number < old):
        raise ConfigError(f"{source}: CRL number {number} is lower than the current {old} (replayed CRL?)")


def identity_warnings(material: TrustMaterial) -> list[str]:
    """Services whose certificate names another identity: peers expecting the service refuse it."""
    warnings = []
    for name, service in material.services.items():
        leaf = service.leaf
        spiffe = service.spiffe_id
        if spiffe is not None:
            if spiffe.split("/", 3)[3:] != [name]:
                warnings.append(
                    f"service {name}: its certificate names {spiffe}, not spiffe://{pki.trust_domain(spiffe)}/{name}; "
                    f"peers that expect {name} will refuse it"
                )
            continue
        dns = pki.dns_names(leaf)
        if not any(entry == name or entry.startswith(name + ".") for entry in dns):
            warnings.append(
                f"service {name}: its certificate names {', '.join(dns) or 'no identity'}, not {name}; "
                f"peers that expect {name} will refuse it"
            )
    return warnings

