"""``python -m llmesh.router.main``: the router service."""

from __future__ import annotations

from llmesh.config import load_config
from llmesh.grpc_server import GrpcServer, run_async
from llmesh.logs import setup_logging
from llmesh.models_file import ModelsFileError, load_models_file
from llmesh.router.config import RouterConfig
from llmesh.router.picker import Picker
from llmesh.router.policy import AutoPolicy, ModelPolicy
from llmesh.router.replicas import Fleet
from llmesh.router.servicer import RouterServicer
from llmesh.v1 import router_pb2, router_pb2_grpc


async def serve(config: RouterConfig) -> None:
    models = load_models_file(config.models_file)
    fleet = Fleet(models, health_check_interval_s=config.health_check_interval_s,
                  health_check_timeout_s=config.health_check_timeout_s,
                  health_check_misses=config.health_check_misses,
                  load_poll_interval_s=config.load_poll_interval_s,
                  stream_stall_timeout_s=config.stream_stall_timeout_s, tls=config,
                  discovery_interval_s=config.discovery_interval_s, discovery_timeout_s=config.discovery_timeout_s,
                  discovery_nameserver=config.discovery_nameserver)
    policy = ModelPolicy(
        models,
        AutoPolicy(long_prompt_tokens=config.auto_long_prompt_tokens, task_hints=config.auto_task_hints,
                   batch_tier_small=config.auto_batch_tier_small),
        healthy=lambda name: len(fleet.pools[name].healthy()),
        window=lambda name: fleet.pools[name].max_model_len())
    picker = Picker(config.prefix_index, cache_weight=config.cache_weight, load_weight=config.load_weight,
                    index_timeout_s=config.index_timeout_s, policy=config.policy, tls=config)
    servicer = RouterServicer(fleet, policy, picker, max_failovers=config.max_failovers,
                              escalation_tokens=config.escalation_tokens,
                              escalation_threshold=config.escalation_threshold,
                              decision_reuse_ms=config.decision_reuse_ms)

    def register(server) -> list[str]:
        router_pb2_grpc.add_RouterServicer_to_server(servicer, server)
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    async def on_shutdown() -> None:
        await fleet.close()
        await picker.close()

    server = GrpcServer("router", config, register, on_shutdown)
    await fleet.start(config.startup_wait_s)
    await server.run()


def main(argv: list[str] | None = None) -> None:
    config = load_config(RouterConfig, argv, service="router")
    setup_logging("router", config.log_level)
    try:
        load_models_file(config.models_file)
    except ModelsFileError as e:
        raise SystemExit(f"llmesh-router: {e}") from None
    run_async(lambda: serve(config))


if __name__ == "__main__":
    main()
