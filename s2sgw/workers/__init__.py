"""Worker processes: one ``twistd s2sgw`` running ``workers = N`` gateways on the same sockets.

The parent (:mod:`~s2sgw.workers.supervisor`) makes one listening socket per route and worker,
spawns the workers (:mod:`~s2sgw.workers.child`), restarts any that dies, passes SIGHUP and
SIGTERM on, reports readiness for all of them and serves the admin endpoint over theirs
(:mod:`~s2sgw.workers.admin`).
"""
