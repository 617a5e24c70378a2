"""The gateway's view of revocation: OCSP client and cache, CRLs and their refresh, the revocation feed, enforcement on live connections, stapling."""
