"""Several real ``twistd s2sgw-ca`` status servers on one PostgreSQL store, and quick clients.

Each replica gets its own copy of the CA directory (as on separate hosts) naming the same
database. The OCSP client here builds and parses requests with ``cryptography`` (no signature
check: the tests that need one ask the real ``openssl ocsp``); the feed client verifies with the
gateway's own :func:`s2sgw.wire.feed.open_document`.
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from s2sgw.wire.feed import FeedDocument, open_document
from tests.e2e import Processes

BIN = Path(sys.executable).parent
TIMEOUT = 30.0



def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ocsp_status(url: str, leaf: x509.Certificate, issuer: x509.Certificate, timeout: float = 5.0) -> str:
    """'good', 'revoked' or 'unknown' as ``url`` answers now (a POST, no nonce)."""
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()
    body = request.public_bytes(serialization.Encoding.DER)
    sent = urllib.request.Request(
        f"{url}/ocsp", data=body, headers={"Content-Type": "application/ocsp-request"}, method="POST"
    )
    with urllib.request.urlopen(sent, timeout=timeout) as answer:
        parsed = ocsp.load_der_ocsp_response(answer.read())
    if parsed.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return parsed.response_status.name.lower()
    return parsed.certificate_status.name.lower()


def feed(url: str, issuers: list[x509.Certificate], since: int, *, wait: bool, timeout: float = 30.0) -> FeedDocument:
    """The verified feed answer for ``since`` (held until news when ``wait``)."""
    query = f"{url}/revocations?since={since}" + ("" if wait else "&wait=0")
    with urllib.request.urlopen(query, timeout=timeout) as answer:
        data = answer.read()
    return open_document(data, issuers, now=datetime.datetime.now(datetime.UTC))


@attrs.define
class Replica:
    name: str
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@attrs.define
class ReplicaSet:
    """``count`` status servers on the CA in ``source`` (made with ``--store``)."""

    source: Path
    processes: Processes
    replicas: list[Replica] = attrs.Factory(list)

    def start(self, count: int, *extra: str) -> list[Replica]:
        for index in range(count):
            name = f"replica-{len(self.replicas) + 1}"
            directory = self.processes.directory / name
            shutil.copytree(self.source, directory)
            self.processes.twistd(name, "s2sgw-ca", "--dir", str(directory), "--listen", "tcp:0:interface=127.0.0.1", *extra)
            self.replicas.append(Replica(name, directory, 0))
        for replica in self.replicas[-count:]:
            replica.port = self._port(replica.name)
            wait_healthy(replica.url)
        return self.replicas[-count:]

    def _port(self, name: str) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"StatusSite starting on (\d+)", self.processes.log(name))
            if found:
                return int(found.group(1))
            process = self.processes.running[name]
            if process.poll() is not None:
                raise AssertionError(f"{name} exited:\n{self.processes.output(name)}")
            time.sleep(0.05)
        raise AssertionError(f"{name} did not listen:\n{self.processes.output(name)}")


def wait_healthy(url: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never became healthy")


def openssl_ocsp(ca_dir: Path, cert: Path, url: str, *extra: str) -> str:
    """What the real ``openssl ocsp`` says about ``cert`` asking ``url`` (verifying the answer)."""
    result = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(ca_dir / "intermediate.pem"), "-cert", str(cert), "-url", url,
         "-CAfile", str(ca_dir / "bundle.pem"), *extra],
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    return result.stdout + result.stderr
