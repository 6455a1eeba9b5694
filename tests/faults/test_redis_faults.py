"""Redis under `llmesh up` loses nothing and every service rides out its outages.

One real mesh (launcher, Redis with its append-only file and password, index, engine,
router, gateway); Redis is SIGKILLed or SHUT DOWN and the launcher restarts it (after
2 s, so the outage is observable). Keys and usage must be intact afterwards, the gateway
must report NOT_SERVING while Redis is down and SERVING after, without any restart of
the services, and the prefix-cache index must take the engine's new blocks again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import pytest
import redis

from llmesh.client import LlmeshClient
from llmesh.gateway.keys import REDIS_PREFIX
from llmesh.gateway.usage_store import read_usage
from tests.faults._launcher_helpers import LLMESH, LlmeshUp, health, wait_until

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    up = LlmeshUp(tmp_path_factory.mktemp("redis-faults"), "--restart-backoff-s", "2",
                  env={"LLMESH_GATEWAY_REDIS_CHECK_INTERVAL_S": "0.2",
                       "LLMESH_PREFIX_CACHE_REDIS_CHECK_INTERVAL_S": "0.2"}).start()
    try:
        up.wait_for("llmesh is up", timeout=300)
        yield up
    finally:
        up.close()


def _redis(mesh: LlmeshUp) -> redis.Redis:
    return redis.Redis.from_url(mesh.redis_url(), socket_timeout=2, decode_responses=True)


def _generate(mesh: LlmeshUp, key: str, prompt: str = "Name a primary color:") -> str:
    with LlmeshClient(mesh.address("gateway"), api_key=key, timeout=60) as client:
        return "".join(c.text for c in client.generate(prompt, MODEL, max_tokens=4, temperature=0))


def _usage(mesh: LlmeshUp) -> dict[str, dict]:
    client = _redis(mesh)
    try:
        return {r["key_id"]: r for r in read_usage(client)}
    finally:
        client.close()


def _restart_redis(mesh: LlmeshUp, how: str) -> None:
    """Stop Redis (``kill -9`` or ``SHUTDOWN``); the gateway must go NOT_SERVING, the launcher
    must restart Redis, and the gateway must come back SERVING."""
    mark = len(mesh.output)
    if how == "kill":
        os.kill(mesh.child_pid("redis-server"), signal.SIGKILL)
    else:
        client = _redis(mesh)
        try:
            client.shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it goes
    wait_until(lambda: health(mesh.address("gateway")) == "NOT_SERVING", 5, "gateway NOT_SERVING")
    mesh.wait_for("redis is back", timeout=30, after=mark)
    wait_until(lambda: health(mesh.address("gateway")) == "SERVING", 5, "gateway SERVING again")


def _wait_usage(mesh: LlmeshUp, key_id: str, requests: int) -> dict:
    return wait_until(lambda: (_usage(mesh).get(key_id) or {}).get("requests", 0) >= requests and
                      _usage(mesh)[key_id], 10, f"{requests} usage rows for {key_id}")


def test_keys_and_usage_survive_redis_kill_9(mesh):
    create = subprocess.run([*LLMESH, "keys", "create", "--tenant", "team-k", "--redis", mesh.redis_url()],
                            capture_output=True, text=True, timeout=60, env=mesh.env)
    assert create.returncode == 0, create.stderr
    key = create.stdout.strip()
    key_id = key.split("_")[1]
    assert _generate(mesh, key)
    before = _wait_usage(mesh, key_id, 1)
    time.sleep(1.5)  # appendfsync everysec: what is a second old is on disk
    gateway_pid = mesh.child_pid("llmesh.gateway.main")

    _restart_redis(mesh, "kill")

    assert _usage(mesh)[key_id] == before
    assert _generate(mesh, key) and _generate(mesh, mesh.api_key())  # both keys still authenticate
    assert _wait_usage(mesh, key_id, 2)["completion_tokens"] > before["completion_tokens"]
    assert mesh.child_pid("llmesh.gateway.main") == gateway_pid  # recovered without a restart
    assert "redis killed by SIGKILL; restarting it in 2 s" in mesh.output


def test_keys_and_usage_survive_redis_shutdown(mesh):
    requests = lambda: sum(r["requests"] for r in _usage(mesh).values())  # noqa: E731
    served = requests()
    assert _generate(mesh, mesh.api_key())
    # Usage is written after the stream ends: the snapshot waits for this request's row, or a
    # row landing after it would read as a change made by the restart.
    wait_until(lambda: requests() > served, 10, "this request's usage row")
    client = _redis(mesh)
    keys_before = {k: client.hgetall(k) for k in client.scan_iter(REDIS_PREFIX + "*")}
    client.close()
    usage_before = _usage(mesh)
    assert keys_before and usage_before

    _restart_redis(mesh, "shutdown")

    client = _redis(mesh)
    assert {k: client.hgetall(k) for k in client.scan_iter(REDIS_PREFIX + "*")} == keys_before
    client.close()
    assert _usage(mesh) == usage_before
    assert "redis exited with code 0; restarting it" in mesh.output


def test_gateway_is_not_serving_while_redis_is_down_and_serving_after_without_restart(mesh):
    gateway_pid = mesh.child_pid("llmesh.gateway.main")
    os.kill(mesh.child_pid("redis-server"), signal.SIGKILL)
    wait_until(lambda: health(mesh.address("gateway")) == "NOT_SERVING", 3, "gateway NOT_SERVING")
    with pytest.raises(grpc.RpcError) as refused:
        _generate(mesh, mesh.api_key())
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in refused.value.details()
    wait_until(lambda: health(mesh.address("gateway")) == "SERVING", 30, "gateway SERVING again")
    assert _generate(mesh, mesh.api_key())
    assert mesh.child_pid("llmesh.gateway.main") == gateway_pid


def test_prefix_cache_index_recovers_after_redis_restart(mesh):
    instance = f"{MODEL}-0"
    client = _redis(mesh)
    owned = lambda: client.scard(f"llmesh:pc:owned:{instance}")  # noqa: E731
    try:
        assert _generate(mesh, mesh.api_key(), "The history of the river " * 12)
        wait_until(lambda: owned() > 0, 10, "the engine's blocks in the index")
        prefix_cache_pid = mesh.child_pid("llmesh.prefix_cache.main")

        _restart_redis(mesh, "kill")
        wait_until(lambda: health(mesh.address("prefix-cache")) == "SERVING", 10, "prefix-cache SERVING")
        held = owned()
        # A prompt never seen before: its blocks can only reach Redis through the index
        # service's reconnected client, published by the engine's re-established link.
        assert _generate(mesh, mesh.api_key(), "A field guide to mountain birds and their songs " * 8)
        wait_until(lambda: owned() > held, 15, "new blocks published after the restart")
        assert client.exists(f"llmesh:pc:live:{instance}")  # heartbeats flow again
        assert mesh.child_pid("llmesh.prefix_cache.main") == prefix_cache_pid
    finally:
        client.close()


def test_redis_requires_the_password_kept_private_in_the_data_folder(mesh):
    for path in (mesh.data_dir / "redis.password", mesh.data_dir / "redis" / "redis.conf"):
        assert path.stat().st_mode & 0o077 == 0, path
    anonymous = redis.Redis(port=mesh.ports["redis"], socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    assert mesh.redis_password() not in mesh.output
    for log in mesh.run_dir.glob("*.log"):
        assert mesh.redis_password() not in log.read_text(errors="replace"), log
    assert list((mesh.data_dir / "redis").glob("appendonlydir/*.aof"))


def test_gateway_started_before_its_redis_is_not_serving_until_redis_answers(tmp_path):
    """No mesh: a gateway whose Redis is not up yet must not claim SERVING at start."""
    from tests.mesh_helpers import RedisServer, ServiceProcess, free_port

    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  - name: {MODEL}\n    path: demo\n")
    redis_server = RedisServer(start=False)
    try:
        with ServiceProcess("llmesh.gateway.main", [
                "--models-file", str(models), "--router", f"127.0.0.1:{free_port()}", "--redis-url", redis_server.url,
                "--redis-check-interval-s", "0.2"]) as gateway:
            time.sleep(1.0)  # several probes after the server's own start
            assert health(gateway.address) == "NOT_SERVING"
            redis_server.start()
            wait_until(lambda: health(gateway.address) == "SERVING", 5, "gateway SERVING once Redis answers")
            redis_server.stop()
            wait_until(lambda: health(gateway.address) == "NOT_SERVING", 5, "gateway NOT_SERVING again")
    finally:
        redis_server.close()
