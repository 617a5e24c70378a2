"""The ``/status`` document of a gateway: what is loaded, what is listening, what the CA said."""

from __future__ import annotations

import datetime
from typing import Any

from s2sgw import pki
from s2sgw.ops.health import Monitor
from s2sgw.wire.est import fingerprint


def status_document(monitor: Monitor) -> dict[str, Any]:
    """The ``/status`` document: plain JSON types, no secrets."""
    now = monitor.now()
    material = monitor.trust_store.material
    document = dict(monitor.trust_store.status())
    state = monitor.readiness()
    document["ready"] = state.ready
    document["reasons"] = list(state.reasons)
    document["now"] = now.isoformat()
    document["last_reload"] = _iso(monitor.trust_store.last_reload)
    document["last_reload_failed"] = monitor.reload_error
    for name, entry in document.get("services", {}).items():
        leaf = material.services[name].leaf
        entry = dict(entry)
        entry["not_before"] = leaf.not_valid_before_utc.isoformat()
        entry["seconds_left"] = round((leaf.not_valid_after_utc - now).total_seconds(), 3)
        entry["chain"] = [
            {"subject": c.subject.rfc4514_string(), "not_after": c.not_valid_after_utc.isoformat()}
            for c in material.services[name].chain[1:]
        ]
        if monitor.probe is not None:
            entry["ca_status"] = monitor.probe.states.get(name)
        for field, section in monitor.service_sections.items():
            value = section(name)
            if value is not None:
                entry[field] = value
        document["services"][name] = entry
    document["trust"] = [
        {
            "subject": root.subject.rfc4514_string(),
            "fingerprint_sha256": fingerprint(root),
            "not_after": root.not_valid_after_utc.isoformat(),
            "seconds_left": round((root.not_valid_after_utc - now).total_seconds(), 3),
        }
        for root in material.roots
    ]
    crl = material.crl
    document["crl"] = (
        None
        if crl is None
        else {
            "number": pki.crl_number(crl),
            "this_update": crl.last_update_utc.isoformat(),
            "next_update": _iso(crl.next_update_utc),
            "revoked": len(crl),
        }
    )
    document["status_checks"] = _checker_status(monitor)
    document["routes"] = {
        name: {
            "direction": route.gate.direction,
            "service": route.route.service,
            "listen": route.route.listen,
            "listening": route.gate.port is not None,
            "address": _address(route.gate.port),
            "live_connections": route.active,
            "max_connections": route.route.max_connections,
            "draining": route.gate.draining,
        }
        for name, route in monitor.routes.items()
    }
    for name, section in monitor.sections.items():
        document[name] = section()
    return document

def _checker_status(monitor: Monitor) -> dict[str, Any]:
    status = monitor.config.status
    stats = monitor.cache_stats
    hits, misses = (None, None) if stats is None else (stats.hits, stats.misses)
    lookups = (hits or 0) + (misses or 0)
    probe = monitor.probe
    return {
        "mode": status.mode,
        "url": status.url,
        "in_use": None if monitor.prober is None else monitor.prober.in_use(),
        "fail": status.fail,
        "cache_entries": None if stats is None else stats.cache_entries,
        "hits": hits,
        "misses": misses,
        "queries": None if stats is None else stats.queries,
        "hit_ratio": round(hits / lookups, 4) if hits is not None and lookups else None,
        "probe": None
        if probe is None
        else {
            "reachable": probe.reachable,
            "error": probe.error,
            "age_seconds": round(monitor.clock.seconds() - probe.at, 3),
            "own_status": dict(probe.states),
        },
    }


def _iso(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _address(port: Any) -> str | None:
    if port is None:
        return None
    address = port.getHost()
    host, number = getattr(address, "host", None), getattr(address, "port", None)
    if number is not None:
        return f"[{host}]:{number}" if ":" in str(host) else f"{host}:{number}"
    name = getattr(address, "name", None)
    return name.decode() if isinstance(name, bytes) else (None if name is None else str(name))
