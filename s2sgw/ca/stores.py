"""Which store a CA directory uses: its own SQLite file, or a PostgreSQL database.

A directory made with ``s2sgw ca init --store postgresql://...`` holds ``store.url`` (mode
0600, one line: the URL) instead of ``ca.db``; every later command and ``twistd s2sgw-ca`` read
it. ``--store URL`` on a later command uses that database instead (the same CA reached under
another host name, a replica's own credentials); the store must then belong to this CA.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from s2sgw.ca.cafiles import read_file
from s2sgw.ca.store import CAError, CAStore

STORE_FILE = "store.url"
SCHEMES = ("postgresql://", "postgres://")


def check_store_url(url: str) -> str:
    """``url`` if it names a PostgreSQL database, else CAError."""
    url = url.strip()
    if not url.startswith(SCHEMES) or "\n" in url:
        raise CAError(f"--store must be a postgresql:// URL, not {url[:40]!r}")
    return url


def recorded_url(directory: Path) -> str | None:
    """The URL in ``DIR/store.url``, or None for a directory with its own SQLite file."""
    path = directory / STORE_FILE
    if not path.exists():
        return None
    return check_store_url(read_file(path, "store file").decode("utf-8", "replace"))


def open_store(directory: Path, database: Path, url: str | None = None):  # -> ICAStore
    """The store of the CA in ``directory``: ``url`` if given, else what the directory records."""
    url = check_store_url(url) if url is not None else recorded_url(directory)
    if url is None:
        if not database.is_file():
            raise CAError(
                f"{directory} is not a CA directory (no {database.name} or {STORE_FILE}; run `s2sgw ca init`)"
            )
        return CAStore(database)
    from s2sgw.ca.pgstore import PgStore

    return PgStore(url)


def root_fingerprint(root: x509.Certificate) -> str:
    return root.fingerprint(hashes.SHA256()).hex()


def check_store_owner(meta: dict[str, object], root: x509.Certificate, directory: Path) -> None:
    """A shared database records the root of the CA it belongs to (the root outlives every
    issuing CA rotation): refuse another CA's database."""
    recorded = meta.get("root_sha256")
    if recorded is not None and recorded != root_fingerprint(root):
        raise CAError(f"the store of {directory} belongs to another CA (its root differs)")


def create_pg_store(url: str, meta: dict[str, object], root: x509.Certificate, first_rows: list) -> None:
    """Make the schema of a new CA in the empty database ``url`` and record ``first_rows``."""
    from s2sgw.ca.pgstore import PgStore

    store = PgStore(url)
    try:
        store.create({**meta, "root_sha256": root_fingerprint(root)})
        for row in first_rows:
            store.insert(row)
    finally:
        store.close()
