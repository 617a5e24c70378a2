"""The demo's scenario: each step sets something up or shows one behaviour, and checks it."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web import server

from s2sgw.ca.authority import CertificateAuthority
from s2sgw.demo.children import Children, DemoFailed
from s2sgw.demo.samples import USER, Collect, UserResource, free_port, root_fingerprint

TRUST_DOMAIN = "demo.s2sgw.test"


LIFETIME = "20s"  # certificates issued over EST: short, so that renewals show within the demo


SERVICES = ("users", "orders", "billing")


def say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@attrs.define(eq=False)
class Demo:
    workdir: Path
    one_process: bool = False
    reactor: Any = None
    children: Children | None = None
    ports: dict[str, int] = attrs.Factory(dict)
    backend_port: Any = None
    users_log: str = "users-gw"  # which log file holds each side's audit lines
    callers_log: str = "callers-gw"
    fingerprint: str = ""  # of the CA's root, as `openssl x509 -noout -fingerprint -sha256` prints it

    # -- orchestration -------------------------------------------------------------------

    async def run(self) -> None:
        say(f"s2sgw demo in {self.workdir}\n")
        await self.step_pki()
        await self.start_ca()
        await self.step_enroll()
        await self.start_backend()
        await self.start_gateways()
        await self.step_allowed_call()
        await self.step_not_allowed()
        await self.step_rogue_ca()
        await self.step_rotation()
        await self.step_renewal()
        await self.step_revocation()

    # -- set-up --------------------------------------------------------------------------

    async def step_pki(self) -> None:
        header(
            "1. A throwaway PKI, and each service enrolls with a one-time token",
            "A root CA, an issuing CA and an OCSP signer. Each service's key is made on its own host by\n"
            "   `s2sgw enroll`, which pins the CA by its root's fingerprint before it sends the token.",
        )
        self.ports = {
            name: free_port() for name in ("ca", "est", "users_gw", "users_backend", "orders_local", "billing_local")
        }

        def make() -> None:
            CertificateAuthority.init(self.workdir / "ca", TRUST_DOMAIN, url=f"http://127.0.0.1:{self.ports['ca']}")
            rogue = CertificateAuthority.init(self.workdir / "rogue-ca", TRUST_DOMAIN)
            rogue.write_identity(rogue.issue("orders"), self.workdir / "rogue")

        await deferToThread(make)
        say("   a rogue CA issued its own 'orders' certificate  ->  rogue/orders.pem")

    async def start_ca(self) -> None:
        self.spawn_twistd(
            "ca",
            [
                "s2sgw-ca", "--dir", str(self.workdir / "ca"), "--listen", f"tcp:{self.ports['ca']}:interface=127.0.0.1",
                "--est", f"tcp:{self.ports['est']}:interface=127.0.0.1", "--est-lifetime", LIFETIME,
            ],
        )
        await self.wait_for_port(self.ports["ca"], "CA status server")
        await self.wait_for_port(self.ports["est"], "CA EST server")
        say(f"   CA status server (OCSP) on http://127.0.0.1:{self.ports['ca']}/ocsp")
        say(f"   CA enrollment (EST) on https://127.0.0.1:{self.ports['est']}, certificates valid {LIFETIME}")

    @property
    def est_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['est']}"

    async def step_enroll(self) -> None:
        self.fingerprint = await deferToThread(root_fingerprint, self.workdir / "ca" / "bundle.pem")
        say(f"   the root's fingerprint, handed to each host with its token: {self.fingerprint}")
        for name in SERVICES:
            line = await self.enroll(name)
            identity, serial = line.split(": serial ", 1)
            say(f"   $ s2sgw ca token {name}; s2sgw enroll --name {name} ...  ->  {identity}, serial {serial[:8]}..")

    async def enroll(self, name: str) -> str:
        """``s2sgw ca token NAME`` on the CA's side, ``s2sgw enroll`` on the service's; its output line."""
        token = (await self.command("ca", "token", "--dir", str(self.workdir / "ca"), name)).strip()
        out = await self.command(
            "enroll", "--ca", self.est_url, "--fingerprint", self.fingerprint, "--token", token,
            "--name", name, "--out", str(self.workdir / "certs"),
        )
        return out.splitlines()[0]

    async def command(self, *args: str) -> str:
        return await self.children.command(*args)

    async def start_backend(self) -> None:
        endpoint = endpoints.TCP4ServerEndpoint(self.reactor, self.ports["users_backend"], interface="127.0.0.1")
        self.backend_port = await endpoint.listen(server.Site(UserResource()))
        say(f"   sample 'users' REST service on 127.0.0.1:{self.ports['users_backend']} (plain HTTP)")

    async def start_gateways(self) -> None:
        users = self.service_toml(
            "users",
            f"""
              [[service.inbound]]
              name = "users-in"
              listen = "tcp:{self.ports['users_gw']}:interface=127.0.0.1"
              backend = "tcp:127.0.0.1:{self.ports['users_backend']}"
              allow = ["orders"]
            """,
        )
        callers = "".join(
            self.service_toml(
                name,
                f"""
                  [[service.outbound]]
                  name = "{name}-to-users"
                  listen = "tcp:{self.ports[name + '_local']}:interface=127.0.0.1"
                  remote = "tcp:127.0.0.1:{self.ports['users_gw']}"
                  peer = "users"
                """,
            )
            for name in ("orders", "billing")
        )
        if self.one_process:
            await self.write_config("gateways", users + callers)
            self.spawn_twistd("gateways", ["s2sgw", "--config", str(self.workdir / "gateways.toml")])
            self.users_log = self.callers_log = "gateways"
        else:
            await self.write_config("users-gw", users)
            await self.write_config("callers-gw", callers)
            self.spawn_twistd("users-gw", ["s2sgw", "--config", str(self.workdir / "users-gw.toml")])
            self.spawn_twistd("callers-gw", ["s2sgw", "--config", str(self.workdir / "callers-gw.toml")])
            self.users_log, self.callers_log = "users-gw", "callers-gw"
        for log, route in ((self.users_log, "users-in"), (self.callers_log, "orders-to-users"), (self.callers_log, "billing-to-users")):
            await self.wait_for_log(log, f"route {route} listening on")
        layout = "one twistd process" if self.one_process else "one twistd process per side"
        say(f"   gateways running ({layout}):")
        say(f"     orders  -> 127.0.0.1:{self.ports['orders_local']} (plain) -> mTLS -> users gateway :{self.ports['users_gw']} -> users service")
        say(f"     billing -> 127.0.0.1:{self.ports['billing_local']} (plain) -> mTLS -> users gateway (billing is not on its allow-list)")

    def service_toml(self, name: str, routes: str) -> str:
        return (
            f'\n[[service]]\nname = "{name}"\ncert = "certs/{name}.pem"\nkey = "certs/{name}.key"\n'
            + textwrap.dedent(routes)
        )

    def write_config(self, name: str, services: str) -> Deferred[int]:
        head = textwrap.dedent(
            f"""\
            # written by s2sgw demo
            trust = "certs/bundle.pem"
            [status]
            mode = "ocsp"
            url = "http://127.0.0.1:{self.ports['ca']}/ocsp"
            fail = "closed"
            [timeouts]
            drain = 2.0
            [enrollment]
            url = "{self.est_url}"
            fingerprint = "{self.fingerprint}"
            """
        )
        return deferToThread((self.workdir / f"{name}.toml").write_text, head + services)

    def spawn_twistd(self, name: str, plugin_args: list[str]) -> None:
        self.children.spawn_twistd(name, plugin_args)

    async def wait_for_log(self, log: str, text: str, timeout: float = 20.0) -> None:
        """Wait for a line in a twistd log (a connection probe would show up in the audit trail)."""
        path = self.workdir / f"{log}.log"
        for _ in range(int(timeout / 0.1)):
            self.children.check()
            if path.exists() and text in await deferToThread(path.read_text, errors="replace"):
                return
            await deferLater(self.reactor, 0.1, lambda: None)
        raise DemoFailed(f"{log} did not log {text!r} within {timeout:.0f} s; see {path}")

    async def wait_for_port(self, port: int, what: str, timeout: float = 20.0) -> None:
        for _ in range(int(timeout / 0.1)):
            self.children.check()
            endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", port, timeout=1)
            try:
                protocol = await endpoint.connect(Factory.forProtocol(Protocol))
            except Exception:
                await deferLater(self.reactor, 0.1, lambda: None)
                continue
            protocol.transport.loseConnection()
            return
        raise DemoFailed(f"{what} did not start listening on port {port} within {timeout:.0f} s")

    # -- the steps -----------------------------------------------------------------------

    async def call(self, local: str) -> tuple[int | None, bytes]:
        """GET /api/users/1 through a caller's local gateway port; (None, b"") when refused."""
        url = f"http://127.0.0.1:{self.ports[local]}/api/users/1"
        try:
            response = await treq.get(url, timeout=5, persistent=False)
            return response.code, await response.content()
        except Exception:
            return None, b""

    async def audit_line(self, log: str, route: str, needle: str, timeout: float = 5.0) -> str:
        """The newest audit line of ``route`` containing ``needle``, without the log prefix."""
        path = self.workdir / f"{log}.log"
        for _ in range(int(timeout / 0.1)):
            text = await deferToThread(path.read_text, errors="replace")
            for line in reversed(text.splitlines()):
                if "s2sgw.audit" in line and f"route={route} " in line and needle in line:
                    return line.split("] ", 1)[-1]
            await deferLater(self.reactor, 0.1, lambda: None)
        raise DemoFailed(f"no audit line of route {route} with {needle!r} in {path}")

    async def step_allowed_call(self) -> None:
        header(
            "2. orders calls users",
            "orders speaks plain HTTP to its own gateway; the gateways authenticate each other with mTLS,\n"
            "   each asks the CA (OCSP) whether the other's certificate is still good, and users' gateway\n"
            "   checks that orders is on its allow-list. Only then do the bytes reach the users service.",
        )
        code, body = await self.call("orders_local")
        say(f"   GET /api/users/1 -> {code} {body.decode(errors='replace')}")
        if code != 200 or json.loads(body) != USER:
            raise DemoFailed("the allowed call did not return the user")
        say("   users gateway:  " + await self.audit_line(self.users_log, "users-in", "outcome=closed"))

    async def step_not_allowed(self) -> None:
        header("3. billing calls users", "billing has a valid certificate from our CA, but users only allows orders.")
        code, _ = await self.call("billing_local")
        if code is not None:
            raise DemoFailed(f"billing was let through (HTTP {code})")
        say("   refused: the connection was closed before any byte reached the users service")
        say("   users gateway:  " + await self.audit_line(self.users_log, "users-in", "reason=identity_not_allowed "))

    async def step_rogue_ca(self) -> None:
        header(
            "4. an impostor with a rogue CA",
            "It presents a certificate naming itself orders, issued by a CA the gateways do not trust.",
        )
        rogue = self.workdir / "rogue"
        key, chain, bundle = await deferToThread(
            lambda: ((rogue / "orders.key").read_text(), (rogue / "orders.pem").read_text(), (self.workdir / "ca" / "bundle.pem").read_bytes())
        )
        client_cert = PrivateCertificate.loadPEM(key + chain)
        trust = Certificate.loadPEM(bundle)
        creator = optionsForClientTLS("users", trustRoot=trust, clientCertificate=client_cert)
        endpoint = endpoints.wrapClientTLS(creator, endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.ports["users_gw"], timeout=5))
        protocol = Collect(b"GET /api/users/1 HTTP/1.0\r\n\r\n")
        try:
            await endpoint.connect(Factory.forProtocol(lambda: protocol))
            received = await protocol.done
        except Exception:
            received = b""
        if received:
            raise DemoFailed("the rogue certificate got an answer")
        say("   refused during the TLS handshake; no byte reached the users service")
        say("   users gateway:  " + await self.audit_line(self.users_log, "users-in", "reason=untrusted_chain "))

    async def step_rotation(self) -> None:
        header(
            "5. users' certificate is rotated by hand",
            "users enrolls again with a new token (a new key, made on its host) and the gateway is told\n"
            "   with SIGHUP (what `systemctl reload` does). orders keeps calling the whole time; no request may fail.",
        )
        old_serial = await self.peer_serial_seen()
        line = await self.enroll("users")
        new_serial = line.split("serial ", 1)[1].split(",", 1)[0]
        failures = 0
        calls = 0
        os.kill(self.children.pid(self.users_log), signal.SIGHUP)
        for _ in range(60):
            code, _ = await self.call("orders_local")
            calls += 1
            failures += code != 200
            seen = await self.peer_serial_seen()
            # Automatic renewal may already have replaced the rotated certificate by a newer one.
            if seen == new_serial or (seen != old_serial and await self.issued_after("users", new_serial, seen)):
                break
        else:
            raise DemoFailed("the users gateway did not present its new certificate after SIGHUP")
        say(f"   users' serial {old_serial} -> {new_serial}; {calls} calls during the reload, {failures} failed")
        if failures:
            raise DemoFailed(f"{failures} calls failed during the rotation")

    async def issued_after(self, name: str, serial: str, other: str | None) -> bool:
        """Whether the CA issued ``other`` to ``name`` after ``serial`` (both hex)."""

        def check() -> bool:
            records = {r.serial_hex: r for r in CertificateAuthority.open(self.workdir / "ca").records() if r.name == name}
            first, second = records.get(serial), records.get(other or "")
            return first is not None and second is not None and second.not_before >= first.not_before

        return await deferToThread(check)

    async def step_renewal(self) -> None:
        header(
            "6. Certificates renew themselves",
            f"Every certificate lives {LIFETIME}. Each gateway renews its own at two thirds of the lifetime,\n"
            "   authenticated by the certificate it replaces, with a new key each time, and reloads.\n"
            "   orders keeps calling the whole time; no request may fail.",
        )
        logs = sorted({self.users_log, self.callers_log})
        seen = {log: len(await self.renewal_lines(log)) for log in logs}
        calls = failures = 0
        shown: list[str] = []
        deadline = self.reactor.seconds() + 60
        while self.reactor.seconds() < deadline:
            code, _ = await self.call("orders_local")
            calls += 1
            failures += code != 200
            for log in logs:
                lines = await self.renewal_lines(log)
                for line in lines[seen[log] :]:
                    shown.append(line)
                    say(f"   {line}")
                seen[log] = len(lines)
            if all(sum(line.startswith(f"{name}:") for line in shown) >= 2 for name in ("users", "orders")):
                break
            await deferLater(self.reactor, 0.2, lambda: None)
        else:
            raise DemoFailed("users and orders did not both renew twice within 60 s; see the gateway logs")
        say(f"   {len(shown)} renewals; {calls} calls meanwhile, {failures} failed")
        if failures:
            raise DemoFailed(f"{failures} calls failed during renewals")

    async def renewal_lines(self, log: str) -> list[str]:
        """'SERVICE: serial OLD.. -> NEW.., valid until HH:MM:SS' for each renewal in a gateway's log so far."""
        path = self.workdir / f"{log}.log"
        text = await deferToThread(path.read_text, errors="replace")
        lines = []
        for line in text.splitlines():
            if "renewed: serial" in line:
                service = line.split("certificate of service ", 1)[1].split(" ", 1)[0]
                serials, until = line.split("renewed: serial ", 1)[1].split(", valid until ", 1)
                old, new = serials.split(" -> ")
                lines.append(f"{service}: serial {old[:8]}.. -> {new[:8]}.., valid until {until[11:19]}")
        return lines

    async def peer_serial_seen(self) -> str | None:
        line = await self.audit_line(self.callers_log, "orders-to-users", "outcome=closed")
        for word in line.split():
            if word.startswith("serial="):
                return word.removeprefix("serial=")
        return None

    async def step_revocation(self) -> None:
        header(
            "7. orders is revoked at the CA, while it holds a live connection",
            "`s2sgw ca revoke orders --reason keyCompromise`. The CA pushes the revocation to every\n"
            "   gateway through its signed feed: orders' open keep-alive connection is closed, and\n"
            "   its new connections are refused.",
        )
        live = Collect(b"GET /api/users/1 HTTP/1.1\r\nHost: users\r\n\r\n")
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.ports["orders_local"], timeout=5)
        await endpoint.connect(Factory.forProtocol(lambda: live))
        for _ in range(50):
            if b"john.doe@example.com" in live.received:
                break
            await deferLater(self.reactor, 0.1, lambda: None)
        else:
            raise DemoFailed("the keep-alive call before the revocation got no answer")
        say("   a keep-alive connection from orders is open and has had its answer")

        revoked_at = self.reactor.seconds()
        await deferToThread(lambda: CertificateAuthority.open(self.workdir / "ca").revoke(name="orders", reason="keyCompromise"))
        try:
            await live.done.addTimeout(5, self.reactor)
        except Exception:
            raise DemoFailed("the live connection of revoked orders was still open 5 s after the revocation") from None
        say(f"   the live connection was closed {self.reactor.seconds() - revoked_at:.2f} s after the revocation")
        say("   users gateway:  " + await self.audit_line(self.users_log, "users-in", "outcome=closed reason=revoked "))

        code, _ = await self.call("orders_local")
        if code is not None:
            raise DemoFailed(f"orders was still admitted after its revocation (HTTP {code})")
        say("   a new call from orders is refused")
        say("   users gateway:  " + await self.audit_line(self.users_log, "users-in", "outcome=refused reason=revoked "))


def header(title: str, explanation: str) -> None:
    say(f"\n{title}\n   {explanation}")
