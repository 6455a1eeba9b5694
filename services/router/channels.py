"""Options of every channel to an engine (the router's and the gateway's in direct mode)."""

from __future__ import annotations

CHANNEL_OPTIONS = [
    # Reconnect quickly to a restarted engine (gRPC's default backoff grows to minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
]
