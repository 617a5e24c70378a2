"""What the CA and the gateway both speak. Pure functions and value types, no services."""
