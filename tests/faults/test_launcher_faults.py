"""`llmesh up` supervises its mesh: real launcher, real children, real signals.

Fast checks first (a taken port, a second launcher on one data folder, a stale Redis, the
restart policy), then one mesh that has its router and engine killed under it, serves a
compose-style models file whose large model is absent, and finally has the launcher
itself SIGKILLed, which must take every child with it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import grpc
import pytest

from llmesh.client import LlmeshClient
from llmesh.local_redis import LocalRedis
from llmesh.supervisor import RestartPolicy, RestartTracker
from tests.faults._launcher_helpers import LLMESH, LlmeshUp, alive, health, process_tree, wait_until
from tests.mesh_helpers import ServiceProcess, free_port

MODEL = "smollm2-135m"


def test_a_taken_port_is_a_clear_error_naming_it_before_anything_starts(tmp_path):
    up = LlmeshUp(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", up.ports["router"]))
        holder.listen()
        proc = subprocess.run(up.argv, capture_output=True, text=True, timeout=60, env=up.env)
    assert proc.returncode == 1, proc.stderr
    assert f"port {up.ports['router']} on 127.0.0.1 (for router) is already in use" in proc.stderr
    assert "starting" not in proc.stderr and "llmesh is up" not in proc.stdout + proc.stderr


def test_a_second_launcher_on_the_same_data_folder_is_refused(tmp_path):
    store = LocalRedis(tmp_path / "data")
    store.acquire()
    try:
        up = LlmeshUp(tmp_path)
        proc = subprocess.run(up.argv, capture_output=True, text=True, timeout=60, env=up.env)
    finally:
        store.release()
    assert proc.returncode == 1
    assert f"another `llmesh up` (pid {os.getpid()}) is using the data folder" in proc.stderr, proc.stderr


def test_a_redis_left_running_by_a_killed_launcher_is_stopped_at_the_next_start(tmp_path):
    store = LocalRedis(tmp_path / "data")
    store.write_conf(store.password())
    port = free_port()
    orphan = subprocess.Popen(store.argv("redis-server", "127.0.0.1", port), stdout=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(lambda: store.pid_file.exists() and store.pid_file.read_text().strip() == str(orphan.pid),
                   10, "redis-server's pidfile")
        said = store.acquire()
        assert said == f"stopped redis-server (pid {orphan.pid}) left running by an earlier llmesh up"
        assert orphan.wait(timeout=10) == 0  # SIGTERM: a clean shutdown, the AOF flushed
        assert not store.pid_file.exists()
    finally:
        store.release()
        if orphan.poll() is None:
            orphan.kill()


def test_restart_backoff_doubles_to_its_cap_and_gives_up_after_quick_failures():
    tracker = RestartTracker(RestartPolicy(backoff_s=0.5, backoff_max_s=3, quick_s=10, max_quick_failures=5))
    assert [tracker.on_exit(1.0) for _ in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert tracker.on_exit(1.0) is None  # the fifth quick failure in a row
    steady = RestartTracker(RestartPolicy(backoff_s=0.5, quick_s=10, max_quick_failures=2))
    assert [steady.on_exit(60.0) for _ in range(5)] == [0.5] * 5  # long runs reset the count


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    up = LlmeshUp(tmp_path_factory.mktemp("launcher-faults")).start()
    try:
        up.wait_for("llmesh is up", timeout=300)
        yield up
    finally:
        up.close()


@pytest.mark.slow
def test_up_prints_the_metrics_port_of_every_service(mesh):
    b = mesh.metrics_base
    for name, port in (("gateway", b), ("router", b + 1), ("prefix-cache", b + 2), (f"engine-{MODEL}-0", b + 10)):
        assert re.search(rf"{re.escape(name)}\s+\S+\s+metrics http://127\.0\.0\.1:{port}/metrics", mesh.output), name


@pytest.mark.slow
def test_a_crashed_router_is_restarted_with_backoff_and_the_launcher_says_so(mesh):
    for delay in ("0.5", "1"):  # a second quick failure waits twice as long
        mark = len(mesh.output)
        os.kill(mesh.child_pid("llmesh.router.main"), signal.SIGKILL)
        mesh.wait_for(f"router killed by SIGKILL; restarting it in {delay} s", timeout=10, after=mark)
        mesh.wait_for("router is back", timeout=60, after=mark)
    wait_until(lambda: health(mesh.address("router")) == "SERVING", 10, "router SERVING")
    with LlmeshClient(mesh.address("gateway"), api_key=mesh.api_key(), timeout=60) as client:
        assert "".join(c.text for c in client.generate("Name a color:", MODEL, max_tokens=4, temperature=0))


@pytest.mark.slow
def test_engine_sigkill_mid_stream_fails_the_stream_within_a_second_then_serves_again(mesh):
    first_token, failed = threading.Event(), {}

    def stream() -> None:
        with LlmeshClient(mesh.address("gateway"), api_key=mesh.api_key(), timeout=120) as client:
            try:
                for _ in client.generate("Count from one to one thousand:", MODEL, max_tokens=2000,
                                         ignore_eos=True, temperature=0):
                    first_token.set()
            except grpc.RpcError as e:
                failed["at"], failed["code"] = time.monotonic(), e.code()
                return
        failed["at"] = None  # the stream ended normally: the kill came too late

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert first_token.wait(60), "no token streamed"
    mark, engine_pid = len(mesh.output), mesh.child_pid("llmesh.engine.service.main")
    killed_at = time.monotonic()
    os.kill(engine_pid, signal.SIGKILL)
    reader.join(10)
    assert failed.get("at") is not None, f"the stream did not fail: {failed}"
    assert failed["at"] - killed_at < 1.0 and failed["code"] == grpc.StatusCode.UNAVAILABLE, failed

    mesh.wait_for(f"engine-{MODEL}-0 killed by SIGKILL; restarting it", timeout=10, after=mark)
    mesh.wait_for(f"engine-{MODEL}-0 is back", timeout=240, after=mark)

    def served() -> bool:
        try:
            with LlmeshClient(mesh.address("gateway"), api_key=mesh.api_key(), timeout=30) as client:
                return bool("".join(c.text for c in client.generate("Name a color:", MODEL, max_tokens=4,
                                                                    temperature=0)))
        except grpc.RpcError:
            return False  # the router has not seen the replica back yet

    wait_until(served, 30, "a generation served by the restarted engine", interval=0.5)


@pytest.mark.slow
def test_gateway_of_the_compose_models_without_large_serves_small_and_reports_large_unavailable(mesh, tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text(f"""default_model: {MODEL}
models:
  - name: {MODEL}
    path: demo
    addresses: ["{mesh.address('engine-base')}"]
  - name: large
    path: {tmp_path}/models/large
    size_class: large
    addresses: ["127.0.0.1:{free_port()}"]
""")
    secret = ["--internal-secret-file", str(mesh.run_dir / "mesh.secret")]  # the launcher's engine wants it
    with ServiceProcess("llmesh.router.main", ["--models-file", str(models), "--startup-wait-s", "1", *secret]) \
            as router, \
            ServiceProcess("llmesh.gateway.main", ["--models-file", str(models), "--router", router.address,
                                                   "--auth", "false", *secret]) as gateway:
        with LlmeshClient(gateway.address, timeout=60) as client:
            assert "".join(c.text for c in client.generate("Name a color:", MODEL, max_tokens=4, temperature=0))
            cards = {m.name: m for m in client.list_models()}
            assert cards[MODEL].healthy_replicas == 1 and cards["large"].healthy_replicas == 0
            with pytest.raises(grpc.RpcError) as refused:
                list(client.generate("Hello", "large", max_tokens=4))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"model 'large' is unavailable: its files are missing at {tmp_path}/models/large" \
            in refused.value.details()
        assert "files missing" in gateway.log_tail()


@pytest.mark.slow
def test_launcher_sigkill_leaves_no_process_behind(mesh):
    tree = process_tree(mesh.proc.pid)
    redis_pid = mesh.child_pid("redis-server")
    assert len(tree) >= 5 and redis_pid in tree
    mesh.proc.send_signal(signal.SIGKILL)
    mesh.proc.wait(10)
    wait_until(lambda: not alive(redis_pid), 10, "redis-server to die with its launcher")
    wait_until(lambda: not [p for p in tree if alive(p)], 30,
               f"every child to die with the launcher: {[tree[p] for p in tree if alive(p)]}")
    assert not (mesh.data_dir / "redis" / "redis.pid").exists()  # Redis shut down cleanly
