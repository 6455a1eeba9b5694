"""``llmesh-engine``: one engine process serving one model replica over gRPC.

    python -m llmesh.engine.service.main --model demo --port 50061
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys

from llmesh.config import load_config
from llmesh.engine.async_llm import AsyncLLM
from llmesh.engine.service.config import EngineServiceConfig
from llmesh.engine.service.index_link import IndexLink, QueueBridge
from llmesh.engine.service.servicer import EngineServicer
from llmesh.engine.service.supervisor import CoreSupervisor, new_epoch
from llmesh.grpc_server import GrpcServer, run_async
from llmesh.logs import setup_logging
from llmesh.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("llmesh.engine")


async def serve(cfg: EngineServiceConfig) -> int:
    """Serve until stopped; returns the process's exit code (1: the core failed for good)."""
    from llmesh.demo_model import find_demo_model

    model = find_demo_model() if cfg.engine.model == "demo" else cfg.engine.model
    loop = asyncio.get_running_loop()
    bridge = QueueBridge(loop) if cfg.prefix_index else None
    engine_cfg = dataclasses.replace(cfg.engine, model=model)
    log.info("loading model", extra={"model": model})
    engine = await asyncio.to_thread(AsyncLLM, engine_cfg, bridge, fault_step_delay_s=cfg.fault_step_delay_s,
                                     fault_fail_step_at=cfg.fault_fail_step_at,
                                     fault_fail_admission=cfg.fault_fail_admission, log_level=cfg.log_level)
    epoch = new_epoch()
    servicer = EngineServicer(engine, instance_id="", epoch=epoch, backend=cfg.engine.backend,
                              quantization=_quantization(model, engine.quantization))
    link: IndexLink | None = None

    def register(server) -> list[str]:
        engine_pb2_grpc.add_EngineServicer_to_server(servicer, server)
        return [engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name]

    async def on_shutdown() -> None:
        if link is not None:
            await link.close()
        await asyncio.to_thread(engine.shutdown)

    server = GrpcServer("engine", cfg, register, on_shutdown)
    address = cfg.advertise_address or server.address
    servicer.instance_id = cfg.instance_id or f"{servicer.model}@{address}"
    servicer.address = address
    if bridge is not None:
        link = IndexLink(cfg.prefix_index, engine, bridge, instance_id=servicer.instance_id, epoch=epoch,
                         namespace=servicer.model, address=address,
                         heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_ttl_s=cfg.heartbeat_ttl_s,
                         tls=cfg)
        link.start()
    supervisor = CoreSupervisor(server, engine, servicer, stall_timeout_s=cfg.stall_timeout_s,
                                restarts=cfg.core_restarts, restart_window_s=cfg.core_restart_window_s,
                                link=lambda: link)
    watch = asyncio.create_task(supervisor.run())
    try:
        await server.run()
        if supervisor.stopping is not None:
            await supervisor.stopping
    finally:
        watch.cancel()
    return supervisor.exit_code


def _quantization(model: str, served: str) -> str:
    return "gguf-dequantized" if served == "none" and model.endswith(".gguf") else served


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(EngineServiceConfig, argv, service="engine")
    setup_logging("engine", cfg.log_level)
    codes: list[int] = []

    async def run() -> None:
        codes.append(await serve(cfg))

    run_async(run)
    return codes[0] if codes else 1


if __name__ == "__main__":
    sys.exit(main())
