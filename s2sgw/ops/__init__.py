"""Operating a gateway: admin endpoint, readiness and /status, metrics, systemd notify, audit, explain and check-config."""
