"""A throwaway PostgreSQL cluster for tests: ``initdb`` in a temporary directory, its own port.

The cluster runs as an unprivileged user (PostgreSQL refuses to run as root; CI runs as root,
so there the server runs as ``nobody`` through ``setpriv``), listens on 127.0.0.1 on a free
port and keeps its unix socket in its own directory. ``stop`` removes everything.
Each test gets a fresh database from :meth:`PgCluster.new_database`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

SUPERUSER = "s2sgw"
UNPRIVILEGED = "nobody"


def bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: $S2SGW_PG_BINDIR, Debian's versioned directory
    (newest first), or PATH. None when PostgreSQL's server is not installed."""
    explicit = os.environ.get("S2SGW_PG_BINDIR")
    candidates = [explicit] if explicit else []

    def version(path: str) -> tuple[int, ...]:
        found = re.search(r"/postgresql/([\d.]+)/bin", path)
        return tuple(int(p) for p in found.group(1).split(".")) if found else (0,)

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@attrs.define
class PgCluster:
    """One running cluster; ``url(database)`` is what ``--store`` takes."""

    root: Path
    bindir: Path
    port: int
    as_user: list[str]
    databases: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.as_user, str(self.bindir / args[0]), *args[1:]],
            check=True, capture_output=True, text=True, timeout=timeout, cwd=self.root,
        )

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        self.databases += 1
        name = f"ca_{os.getpid()}_{self.databases}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        shutil.rmtree(self.root, ignore_errors=True)


def _unprivileged_prefix(root: Path) -> list[str]:
    """Run as ``nobody`` when we are root (PostgreSQL refuses root); as ourselves otherwise."""
    if os.geteuid() != 0:
        return []
    user = pwd.getpwnam(UNPRIVILEGED)
    for path in [root, *root.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


def start_cluster() -> PgCluster:
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (bash dev.sh test installs it)")
    root = Path(tempfile.mkdtemp(prefix="s2sgw-pg-"))
    os.chmod(root, 0o700)
    (root / "socket").mkdir()
    as_user = _unprivileged_prefix(root)
    cluster = PgCluster(root=root, bindir=bindir, port=0, as_user=as_user)
    try:
        cluster._run(
            "initdb", "-D", str(cluster.data), "-U", SUPERUSER, "--auth=trust", "--no-sync", "-E", "UTF8",
            "--locale=C", timeout=120,
        )
        for _attempt in range(5):  # another process may take the port between probe and bind
            cluster.port = _free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -p {cluster.port} -k {cluster.socket_dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
            )
            try:
                cluster._run(
                    "pg_ctl", "start", "-D", str(cluster.data), "-w", "-t", "60",
                    "-l", str(root / "server.log"), "-o", options, timeout=90,
                )
                return cluster
            except subprocess.CalledProcessError:
                continue
        raise RuntimeError("PostgreSQL did not start: " + (root / "server.log").read_text()[-2000:])
    except BaseException:
        cluster.stop()
        raise


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
