"""Usage per key and model kept in Redis and shown by `llmesh usage`, and the gateway's
auth / rate-limit / Redis metrics, against real processes."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.test_auth import MODEL, add_key, bearer, code_of, engine_and_router, generate, start_gateway
from tests.mesh_helpers import RedisServer, free_port


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("usage-mesh")
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(RedisServer())
        router, models_file = stack.enter_context(engine_and_router(tiny_llama, run_dir))
        metrics_port = free_port()
        gateway = stack.enter_context(start_gateway(router, models_file, "--redis-url", redis_server.url,
                                                    "--metrics-port", str(metrics_port)))
        yield {"redis": redis_server, "gateway": gateway.address, "metrics_port": metrics_port}


def _usage(url: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "llmesh.cli", "usage", "--json", "--redis", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_usage_is_counted_per_key_and_model(mesh):
    key, key_id = add_key(mesh["redis"].url, tenant="billing")
    streams = [generate(mesh["gateway"], bearer(key), max_tokens=n, ignore_eos=True) for n in (3, 5)]
    finals = [s[-1].usage for s in streams]
    assert [u.completion_tokens for u in finals] == [3, 5]
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in _usage(mesh["redis"].url) if r["key_id"] == key_id]
        if rows and rows[0]["requests"] == 2:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)
    row = rows[0]
    assert row["model"] == MODEL and row["tenant"] == "billing"
    assert row["completion_tokens"] == 8
    assert row["prompt_tokens"] == sum(u.prompt_tokens for u in finals)
    assert row["cached_tokens"] == sum(u.cached_tokens for u in finals)
    table = subprocess.run([sys.executable, "-m", "llmesh.cli", "usage", "--redis", mesh["redis"].url],
                           capture_output=True, text=True, timeout=60)
    assert key_id in table.stdout and "billing" in table.stdout


def test_refusals_are_counted_in_metrics(mesh):
    key, _ = add_key(mesh["redis"].url, rpm=1)
    generate(mesh["gateway"], bearer(key))
    assert code_of(lambda: generate(mesh["gateway"], bearer(key)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code_of(lambda: generate(mesh["gateway"], ()))[0] == grpc.StatusCode.UNAUTHENTICATED
    text = urllib.request.urlopen(f"http://127.0.0.1:{mesh['metrics_port']}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("llmesh_gateway_rate_limited_total", (("limit", "requests_per_minute"),))] >= 1
    assert samples[("llmesh_gateway_auth_failures_total", (("reason", "missing"),))] >= 1
    assert samples[("llmesh_gateway_requests_total",
                    (("code", "RESOURCE_EXHAUSTED"), ("model", MODEL), ("rpc", "Generate")))] >= 1
