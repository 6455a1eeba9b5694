"""EngineServiceConfig: everything one engine process needs, from flags and environment.

The engine's own options come from EngineConfig (one flag each, same name, same default);
only what is about the process — ports, TLS, the prefix-cache index, health — is declared here.
"""

from __future__ import annotations

import dataclasses

from llmesh.config import group, option, require
from llmesh.engine.config import EngineConfig
from llmesh.grpc_server import ServiceConfig


@dataclasses.dataclass
class EngineServiceConfig(ServiceConfig):
    """llmesh engine: serves one model replica over gRPC (Engine service)."""

    engine: EngineConfig = group(EngineConfig, model="demo")
    prefix_index: str | None = option(None, "host:port of the prefix-cache index to publish KV events to")
    instance_id: str | None = option(None, "replica id in the index (default: model@advertise address)")
    advertise_address: str | None = option(None, "host:port the router reaches this engine at (default: bound address)")
    heartbeat_interval_s: float = option(2.0, "seconds between heartbeats to the index")
    heartbeat_ttl_s: float = option(10.0, "the index forgets this replica after this long without a heartbeat")
    stall_timeout_s: float = option(
        30.0, "report NOT_SERVING when the step loop has work but no step finished for this long")
    core_restarts: int = option(
        3, "after the engine core fails (a step raised, the process died) start a fresh one, at most this "
           "many times per core_restart_window_s; past that (or with 0) the engine process exits with "
           "code 1 so that its supervisor restarts it")
    core_restart_window_s: float = option(600.0, "the window core_restarts counts restarts in")
    fault_step_delay_s: float = option(0.0, "fault injection for tests: sleep this long before every step")
    fault_fail_step_at: int = option(
        0, "fault injection for tests: each engine core's N-th step raises (0: never)")
    fault_fail_admission: bool = option(
        False, "fault injection for tests: admitting any request fails with an internal error")

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s must be > 0")
        require(self.heartbeat_ttl_s > self.heartbeat_interval_s,
                "heartbeat_ttl_s must exceed heartbeat_interval_s or the index forgets live replicas")
        require(self.stall_timeout_s > 0, "stall_timeout_s must be > 0")
        require(self.core_restarts >= 0, "core_restarts must be >= 0")
        require(self.core_restart_window_s > 0, "core_restart_window_s must be > 0")
        require(self.fault_step_delay_s >= 0, "fault_step_delay_s must be >= 0")
        require(self.fault_fail_step_at >= 0, "fault_fail_step_at must be >= 0")
