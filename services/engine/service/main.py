"""``llmesh-engine``: one engine process serving one model replica over gRPC.

    python -m llmesh.engine.service.main --model demo --port 50061
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time

from llmesh.config import load_config
from llmesh.engine.async_llm import AsyncLLM
from llmesh.engine.service.config import EngineServiceConfig
from llmesh.engine.service.index_link import IndexLink, QueueBridge
from llmesh.engine.service.servicer import EngineServicer
from llmesh.grpc_server import GrpcServer, run_async
from llmesh.logs import setup_logging
from llmesh.v1 import engine_pb2, engine_pb2_grpc

log = logging.getLogger("llmesh.engine")


async def _watch_health(server: GrpcServer, engine: AsyncLLM, stall_timeout_s: float) -> None:
    """NOT_SERVING while the step loop has work but has not advanced for stall_timeout_s,
    and for good once the engine core is dead."""
    serving = True
    while True:
        if engine.dead is not None:
            await server.set_serving(False)
            log.error("engine core is dead (%s): reporting NOT_SERVING", engine.dead)
            return
        stalled = engine.has_work and engine.seconds_since_progress() > stall_timeout_s
        if stalled == serving:
            serving = not stalled
            await server.set_serving(serving)
            log.warning("engine step loop %s", "stalled: reporting NOT_SERVING" if stalled else "recovered")
        await asyncio.sleep(min(0.1, stall_timeout_s / 4))


async def serve(cfg: EngineServiceConfig) -> None:
    from llmesh.demo_model import find_demo_model

    model = find_demo_model() if cfg.engine.model == "demo" else cfg.engine.model
    loop = asyncio.get_running_loop()
    bridge = QueueBridge(loop) if cfg.prefix_index else None
    engine_cfg = dataclasses.replace(cfg.engine, model=model)
    log.info("loading model", extra={"model": model})
    engine = await asyncio.to_thread(AsyncLLM, engine_cfg, bridge, fault_step_delay_s=cfg.fault_step_delay_s,
                                     fault_fail_step_at=cfg.fault_fail_step_at, log_level=cfg.log_level)
    epoch = time.time_ns() // 1_000_000  # grows across restarts: the index replaces older state
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
    if bridge is not None:
        link = IndexLink(cfg.prefix_index, engine, bridge, instance_id=servicer.instance_id, epoch=epoch,
                         namespace=servicer.model, address=address,
                         heartbeat_interval_s=cfg.heartbeat_interval_s, heartbeat_ttl_s=cfg.heartbeat_ttl_s,
                         tls=cfg)
        link.start()
    watch = asyncio.create_task(_watch_health(server, engine, cfg.stall_timeout_s))
    try:
        await server.run()
    finally:
        watch.cancel()


def _quantization(model: str, served: str) -> str:
    return "gguf-dequantized" if served == "none" and model.endswith(".gguf") else served


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(EngineServiceConfig, argv, service="engine")
    setup_logging("engine", cfg.log_level)
    run_async(lambda: serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
