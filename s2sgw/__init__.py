"""s2sgw: a service-to-service authentication gateway (mutual TLS beside each service)."""

__version__ = "0.1.0"
