"""Workloads are reproducible and shaped as asked; metrics, compare and plots are well formed."""

from __future__ import annotations

import argparse
import math

import pytest

from llmesh.bench import plots
from llmesh.bench.cli import add_bench_commands
from llmesh.bench.loadgen import RequestResult, RunResult
from llmesh.bench.metrics import Slo, percentile, summarize
from llmesh.bench.report import compare
from llmesh.bench.sweep import LoadPoint
from llmesh.bench.workloads import KINDS, WorkloadConfig, arrival_offsets, build_requests
from llmesh.engine.errors import InvalidRequestError


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_requests_and_lengths_fit(kind):
    cfg = WorkloadConfig(kind=kind, num_requests=20, vocab_size=300, max_model_len=512, seed=3)
    a, b = build_requests(cfg), build_requests(cfg)
    assert [(r.prompt_token_ids, r.max_tokens) for r in a] == [(r.prompt_token_ids, r.max_tokens) for r in b]
    for r in a:
        assert r.prompt_token_ids and all(10 <= t < 300 for t in r.prompt_token_ids)
        assert 1 <= r.max_tokens and len(r.prompt_token_ids) + r.max_tokens <= 512


def test_content_seed_changes_tokens_not_shapes():
    cfg = WorkloadConfig(kind="lognormal", num_requests=10, seed=1)
    a, b = build_requests(cfg, content_seed=1), build_requests(cfg, content_seed=2)
    assert [len(r.prompt_token_ids) for r in a] == [len(r.prompt_token_ids) for r in b]
    assert [r.max_tokens for r in a] == [r.max_tokens for r in b]
    assert [r.prompt_token_ids for r in a] != [r.prompt_token_ids for r in b]


def test_shared_prefix_requests_share_their_system_prompt():
    cfg = WorkloadConfig(kind="shared-prefix", num_requests=8, num_prefixes=2, prefix_len=32, input_len=8)
    reqs = build_requests(cfg)
    assert {r.group for r in reqs} == {"prefix-0", "prefix-1"}
    by_group = {}
    for r in reqs:
        by_group.setdefault(r.group, set()).add(tuple(r.prompt_token_ids[:32]))
        assert len(r.prompt_token_ids) == 40
    assert all(len(s) == 1 for s in by_group.values()) and len({*by_group["prefix-0"], *by_group["prefix-1"]}) == 2


def test_poisson_arrivals_have_the_asked_rate():
    offsets = arrival_offsets(2000, 4.0, seed=0)
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert 3.6 < len(offsets) / offsets[-1] < 4.4
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(InvalidRequestError):
        arrival_offsets(3, 0.0, 0)


def test_bad_workload_is_a_user_error():
    with pytest.raises(InvalidRequestError, match="kind"):
        WorkloadConfig(kind="nope")
    with pytest.raises(InvalidRequestError, match="num_requests"):
        WorkloadConfig(num_requests=0)


def _run() -> RunResult:
    ok = RequestResult(10, 4, chunk_times=[0.1, 0.2, 0.3, 0.4], chunk_tokens=[1, 1, 1, 1], e2e=0.4)
    slow = RequestResult(10, 4, chunk_times=[3.0, 3.5], chunk_tokens=[1, 3], e2e=3.5)
    bad = RequestResult(10, 4, e2e=0.01, error="UNAVAILABLE")
    return RunResult("t", 1.0, None, 2.0, [ok, slow, bad])


def test_summary_numbers():
    m = summarize(_run(), Slo(ttft_ms=1000, tpot_ms=500))
    assert m["completed_n"] == 2 and m["failed_n"] == 1 and m["errors_unavailable_n"] == 1
    assert m["out_tok_s"] == pytest.approx(8 / 2.0)
    assert m["ttft_p50_ms"] == pytest.approx(1550.0)
    assert m["tpot_p50_ms"] == pytest.approx((100 + 500 / 3) / 2)
    assert m["goodput_req_s"] == pytest.approx(0.5) and m["goodput_frac"] == pytest.approx(1 / 3)
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values())
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 99) == 0.0


def test_compare_prints_every_metric_and_direction():
    a = {"metrics": {"out_tok_s": 10.0, "ttft_p50_ms": 100.0}, "workload": {"seed": 0}}
    b = {"metrics": {"out_tok_s": 12.0, "ttft_p50_ms": 120.0, "extra_n": 1}, "workload": {"seed": 1}}
    text = compare(a, b)
    assert "workloads differ in seed" in text
    line = {ln.split()[0]: ln for ln in text.splitlines()[3:]}
    assert "+20.0%" in line["out_tok_s"] and line["out_tok_s"].endswith("better")
    assert line["ttft_p50_ms"].endswith("worse") and "extra_n" in line


def test_plots_are_pngs_when_matplotlib_is_there(tmp_path):
    run = _run()
    cdf = plots.plot_latency_cdfs([run], tmp_path / "cdf.png")
    sweep = plots.plot_rate_sweep({"t": [(1.0, summarize(run)), (2.0, summarize(run))]}, tmp_path / "sweep.png")
    if not plots.available():
        assert cdf is None and sweep is None
        return
    for p in (cdf, sweep):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cdf_legend_p50_is_the_result_files_p50():
    run = _run()
    ttfts = plots.latency_samples(run)["ttft"]  # two requests: the p50 lies between them
    assert plots.cdf_legend("t", sorted(ttfts)) == f"t (p50 {summarize(run)['ttft_p50_ms']:.1f} ms)"
    assert plots.cdf_legend("t", [1.0, 2.0, 3.0, 4.0]) == "t (p50 2.5 ms)"


def test_load_points_are_named_by_what_limits_them():
    assert (LoadPoint(16).key, LoadPoint(16).label) == ("r16", "rate 16 req/s")
    assert (LoadPoint(max_concurrency=256).key, LoadPoint(max_concurrency=256).label) == ("c256", "concurrency 256")
    assert (LoadPoint(0.5, 8).key, LoadPoint(0.5, 8).label) == ("r0p5_c8", "rate 0.5 req/s, concurrency 8")
    assert (LoadPoint().key, LoadPoint().label) == ("rinf", "all at once")


def test_num_prompts_is_an_alias_of_num_requests():
    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers())
    for flag in ("--num-prompts", "--num-requests"):
        assert parser.parse_args(["bench", "serve", flag, "7"]).num_requests == 7
