"""Certificates that renew themselves: EST (RFC 7030) enrollment and renewal, gateway side.

``client`` speaks EST over treq with a pinned root; ``command`` is ``s2sgw enroll`` (first
certificate, from a one-time token); ``renewal`` renews each service's certificate inside the
gateway; ``bundle`` keeps the trust bundle in step with the CA's ``/cacerts``. Nothing here
imports the CA: both sides share only :mod:`s2sgw.wire.est`.
"""
