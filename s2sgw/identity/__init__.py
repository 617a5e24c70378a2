"""Caller identity towards the backend: PROXY v2, HTTP identity headers, JWT bearer tokens."""
