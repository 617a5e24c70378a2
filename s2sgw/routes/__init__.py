"""Routes: the data path of a gateway. Inbound (peers -> mTLS -> backend) and outbound (local client -> mTLS -> peer), the gate both share, and the authorizer that decides."""
