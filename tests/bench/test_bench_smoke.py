"""CI smoke test of ``llmesh bench`` on the CPU with the tiny model: every mode runs end
to end over real processes and writes well-formed results. No assertion on speed."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from llmesh.bench.metrics import summarize
from llmesh.bench.offline import run_offline
from llmesh.bench.overhead import measure_overhead, mesh_addresses, router_address
from llmesh.bench.workloads import WorkloadConfig, build_requests
from llmesh.engine import LLM
from llmesh.launcher import Mesh, UpConfig
from llmesh.mesh_secret import MESH_SECRET_FILE
from tests.mesh_helpers import free_ports

LLMESH = [sys.executable, "-m", "llmesh.cli"]
SMALL = ["--num-requests", "6", "--input-len", "16", "--output-len", "4", "--no-progress"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, tiny_llama):
    run_dir = tmp_path_factory.mktemp("bench-mesh")
    models = {"default_model": "tiny", "models": [{
        "name": "tiny", "path": tiny_llama, "size_class": "small", "replicas": 1,
        "engine": {"dtype": "float32", "num_kv_blocks": 128, "max_model_len": 256}}]}
    (run_dir / "models.in.yaml").write_text(yaml.safe_dump(models))
    gateway, router, prefix_cache, engine_base, redis, http = free_ports(6)
    cfg = UpConfig(models_file=str(run_dir / "models.in.yaml"), gateway_port=gateway,
                   router_port=router, prefix_cache_port=prefix_cache, engine_base_port=engine_base,
                   http_port=http,
                   redis_port=redis, metrics_base_port=0, device="cpu", run_dir=str(run_dir), auth=False)
    with Mesh(cfg, quiet=True) as m:
        m.start(timeout=180)
        yield m


def _well_formed(doc: dict) -> dict:
    assert {"device", "commit", "command", "date", "workload", "metrics"} <= set(doc)
    m = doc["metrics"]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
    return m


def _bench(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LLMESH, "bench", *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_serve_against_gateway_sweep_and_engine_then_compare(mesh, tmp_path):
    gateway, engine, _ = mesh_addresses(mesh)
    _bench("serve", "--address", gateway, "--rate", "20", "inf", "--workload", "chat", "--max-model-len", "200",
           "--name", "gw", "--results-dir", str(tmp_path), *SMALL)
    secret = ("--internal-secret-file", str(mesh.run_dir / MESH_SECRET_FILE))
    eng_run = _bench("serve", "--address", engine, "--engine", *secret, "--max-concurrency", "3", "--workload",
                     "shared-prefix", "--num-prefixes", "2", "--prefix-len", "32", "--name", "eng",
                     "--results-dir", str(tmp_path), *SMALL)
    assert "concurrency 3" in eng_run.stdout and "rate inf" not in eng_run.stdout
    _bench("serve", "--address", router_address(mesh), "--router", *secret, "--model", "tiny", "--name", "rt",
           "--results-dir", str(tmp_path), "--no-plots", *SMALL)
    assert _well_formed(json.loads((tmp_path / "rt.json").read_text()))["completed_n"] == 6
    gw = _well_formed(json.loads((tmp_path / "gw.json").read_text()))
    eng = _well_formed(json.loads((tmp_path / "eng.json").read_text()))
    for prefix in ("r20_", "rinf_"):
        assert gw[f"{prefix}completed_n"] == 6 and gw[f"{prefix}failed_n"] == 0
        assert gw[f"{prefix}ttft_p50_ms"] > 0 and gw[f"{prefix}out_tok_s"] > 0
    assert eng["completed_n"] == 6 and eng["out_tokens_n"] == 24 and eng["ttft_p50_ms"] <= eng["e2e_p50_ms"]
    assert eng["tpot_p50_ms"] > 0 and eng["itl_p99_ms"] > 0 and eng["goodput_req_s"] >= 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs in ([], ["eng_cdf.png", "gw_cdf.png"])  # no sweep plot: one finite rate only
    out = _bench("compare", str(tmp_path / "eng.json"), str(tmp_path / "gw.json")).stdout
    assert "out_tokens_n" in out and "workloads differ" in out


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_serve_openai_backend_against_llmesh_http_front(mesh, tmp_path, endpoint):
    """The OpenAI backend drives llmesh's own HTTP front and times every token as the gRPC one."""
    base_url = f"http://127.0.0.1:{mesh.cfg.http_port}/v1"
    _bench("serve", "--backend", "openai", "--base-url", base_url, "--openai-endpoint", endpoint,
           "--max-concurrency", "3", "--name", "oa", "--results-dir", str(tmp_path), "--no-plots", *SMALL)
    doc = json.loads((tmp_path / "oa.json").read_text())
    m = _well_formed(doc)
    assert doc["workload"]["target"] == "openai" and doc["workload"]["address"] == base_url
    assert m["completed_n"] == 6 and m["failed_n"] == 0 and m["out_tokens_n"] == 24
    assert 0 < m["ttft_p50_ms"] <= m["e2e_p50_ms"] and m["tpot_p50_ms"] > 0


def test_overhead_direct_vs_mesh(mesh):
    gateway, engine, model = mesh_addresses(mesh)
    wl = WorkloadConfig(num_requests=4, input_len=16, output_len=4)
    res = asyncio.run(measure_overhead(gateway, engine, model, wl, rate=50.0, rounds=2, warmup=1, probes=2,
                                       router=router_address(mesh), timeout=60, progress=False,
                                       credential=mesh.credential()))
    m = res.metrics
    for key in ("idle_direct_ttft_p50_ms", "idle_router_ttft_p50_ms", "idle_mesh_ttft_p50_ms"):
        assert m[key] > 0
    assert m["mesh_idle_added_ttft_p50_ms"] == pytest.approx(
        m["router_hop_idle_added_ttft_p50_ms"] + m["gateway_hop_idle_added_ttft_p50_ms"])
    assert len(res.direct.requests) == len(res.mesh.requests) == 8
    assert m["direct_completed_n"] == m["mesh_completed_n"] == 8
    assert m["mesh_throughput_ratio_frac"] > 0
    for key in ("mesh_added_ttft_p50_ms", "mesh_added_ttft_p99_ms", "mesh_ttft_p50_ms", "direct_tpot_p50_ms",
                "mesh_itl_p99_ms", "direct_out_tok_s", "mesh_goodput_req_s"):
        assert math.isfinite(m[key])


def test_offline_runs_the_same_workload(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", dtype="float32", num_kv_blocks=128)
    cfg = WorkloadConfig(kind="lognormal", num_requests=5, input_len=16, output_len=4, vocab_size=512)
    run = run_offline(llm, build_requests(cfg), progress=False)
    m = summarize(run)
    assert m["completed_n"] == 5 and m["failed_n"] == 0
    assert m["out_tokens_n"] == sum(r.max_tokens for r in build_requests(cfg))
    assert m["ttft_p50_ms"] > 0 and m["out_tok_s"] > 0
