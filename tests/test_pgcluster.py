"""The test PostgreSQL cluster: an unprivileged server of our own on loopback, gone when stopped."""

from __future__ import annotations

import psycopg

from tests.pgcluster import running_cluster


def test_a_cluster_runs_unprivileged_on_loopback_and_is_removed_when_stopped() -> None:
    with running_cluster() as cluster:
        with psycopg.connect(cluster.new_database(), autocommit=True) as connection:
            user = connection.execute("SELECT current_setting('listen_addresses')").fetchone()
            assert user == ("127.0.0.1",)
            (socket_dir,) = connection.execute("SELECT current_setting('unix_socket_directories')").fetchone()
            assert socket_dir == str(cluster.socket_dir)
        owner = (cluster.data / "PG_VERSION").stat().st_uid
        assert owner != 0  # PostgreSQL refuses root; the data belongs to an unprivileged user
        root = cluster.root
    assert not root.exists()
