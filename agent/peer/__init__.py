"""The authenticated peer channel: certificates, mutual TLS, the peer API server and client."""
