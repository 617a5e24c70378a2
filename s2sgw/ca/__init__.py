"""The certificate authority: issuing, revocation, CRLs and the status server."""
