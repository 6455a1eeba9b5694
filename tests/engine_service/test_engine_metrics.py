"""The engine's /metrics after real requests to a real engine process: every llmesh_engine_*
metric is there with values that match what was sent."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from tests.mesh_helpers import free_port, start_engine

PROMPT = [5, 17, 99, 23, 42, 7, 300, 12, 64, 128, 256, 33, 91, 18, 44, 71, 3, 250]


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def samples(self) -> dict[tuple[str, tuple], float]:
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(self, name: str, samples: dict | None = None, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        samples = self.samples() if samples is None else samples
        found = [v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items()]
        assert found, f"{name}{labels} is not in {self.url}"
        return sum(found)

    def wait_for(self, name: str, predicate, timeout: float = 10.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        while True:
            v = self.value(name, **labels)
            if predicate(v):
                return v
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}{labels} stayed at {v}")
            time.sleep(0.05)


def _engine(tiny_llama: str, *args: str):
    port = free_port()
    return start_engine(tiny_llama, "--max-model-len", "512", "--metrics-port", str(port), *args), Scraper(port)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    # 8 blocks of 16 tokens: enough for one request at a time, too few for three at once. Steps
    # of at least 5 ms keep a 110-token request running for half a second, long enough to be
    # scraped mid-flight (the tiny model alone can finish it between two scrapes).
    proc, scraper = _engine(tiny_llama, "--num-kv-blocks", "8", "--fault-step-delay-s", "0.005")
    with proc:
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel(proc.address))
        model = stub.Info(engine_pb2.InfoRequest(), timeout=10).model
        yield stub, scraper, model


def _request(rid: str, prompt=PROMPT, max_tokens: int = 6, **kw) -> engine_pb2.EngineGenerateRequest:
    sampling = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sampling.update(kw)
    return engine_pb2.EngineGenerateRequest(request_id=rid, prompt_token_ids=prompt,
                                            sampling=common_pb2.SamplingParams(**sampling))


def _delta(before: dict, after: dict, name: str, scraper: Scraper, **labels: str) -> float:
    return scraper.value(name, after, **labels) - scraper.value(name, before, **labels)


def test_request_counts_tokens_and_latencies_match_the_requests_sent(engine):
    stub, scraper, model = engine
    before = scraper.samples()
    for i in range(3):
        chunks = list(stub.Generate(_request(f"count-{i}", max_tokens=6), timeout=60))
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    scraper.wait_for("llmesh_engine_request_success_total", lambda v: v >= 3, model=model,
                     finished_reason="length")
    after = scraper.samples()

    def d(name: str, **labels: str) -> float:
        return _delta(before, after, name, scraper, model=model, **labels)

    assert d("llmesh_engine_request_success_total", finished_reason="length") == 3
    assert d("llmesh_engine_generation_tokens_total") == 18
    assert d("llmesh_engine_prompt_tokens_total") == 3 * len(PROMPT)
    assert d("llmesh_engine_request_prompt_tokens_count") == 3
    assert d("llmesh_engine_request_prompt_tokens_sum") == 3 * len(PROMPT)
    assert d("llmesh_engine_request_generation_tokens_sum") == 18
    assert d("llmesh_engine_time_to_first_token_seconds_count") == 3
    assert d("llmesh_engine_inter_token_latency_seconds_count") == 3 * 5
    for name in ("time_per_output_token", "request_queue_time", "request_prefill_time", "request_decode_time",
                 "e2e_request_latency"):
        assert d(f"llmesh_engine_{name}_seconds_count") == 3, name
        assert d(f"llmesh_engine_{name}_seconds_sum") >= 0, name
    # Each request's decode time is made of its inter-token gaps, and its TTFT covers its queue and prefill.
    assert d("llmesh_engine_request_decode_time_seconds_sum") == pytest.approx(
        d("llmesh_engine_inter_token_latency_seconds_sum"), rel=1e-6, abs=1e-6)
    assert d("llmesh_engine_time_to_first_token_seconds_sum") >= d("llmesh_engine_request_prefill_time_seconds_sum")
    # Every step's tokens: each prompt once (nothing cached yet beyond the shared prefix) and the decodes.
    assert d("llmesh_engine_iteration_tokens_total_count") >= 6
    assert d("llmesh_engine_iteration_tokens_total_sum") >= 3 * 5 + len(PROMPT)


def _gauges_while_running(stub, scraper, model, rid: str):
    """Start one request and scrape until the gauges show it running. Returns those gauges
    and the thread that drains the stream, or None if the request ended before any scrape
    saw it (a loaded host can finish a tiny model's request between two scrapes)."""
    # 18 + 110 tokens fill the 8 blocks of 16 exactly: the longest request the cache holds.
    stream = stub.Generate(_request(rid, prompt=PROMPT, max_tokens=110), timeout=120)
    next(stream)
    ended = threading.Event()
    drain = threading.Thread(target=lambda: (list(stream), ended.set()), daemon=True)
    drain.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not ended.is_set():
        # One scrape for all three gauges, so they describe the same moment.
        samples = scraper.samples()
        gauges = tuple(scraper.value(f"llmesh_engine_{name}", samples, model=model) for name in
                       ("num_requests_running", "kv_cache_usage_perc", "num_requests_waiting"))
        if gauges[0] == 1 and gauges[1] > 0:
            return gauges, drain
        time.sleep(0.01)
    stream.cancel()
    drain.join(timeout=30)
    return None


def test_running_and_kv_usage_rise_during_a_request_and_return_to_zero(engine):
    stub, scraper, model = engine
    seen = None
    for attempt in range(3):
        seen = _gauges_while_running(stub, scraper, model, f"long-{attempt}")
        if seen is not None:
            break
    assert seen is not None, "no scrape saw the request running in three attempts"
    (running, usage, waiting), drain = seen
    assert running == 1 and 0 < usage <= 1 and waiting == 0
    drain.join(timeout=120)
    assert not drain.is_alive()
    scraper.wait_for("llmesh_engine_num_requests_running", lambda v: v == 0, model=model)
    assert scraper.wait_for("llmesh_engine_kv_cache_usage_perc", lambda v: v < 0.02, model=model) >= 0


def test_a_repeated_prompt_counts_prefix_cache_hits_in_tokens(engine):
    stub, scraper, model = engine
    prompt = list(range(200, 240))  # 40 tokens: two full blocks of 16 can be reused
    before = scraper.samples()
    list(stub.Generate(_request("prefix-a", prompt=prompt, max_tokens=2), timeout=60))
    list(stub.Generate(_request("prefix-b", prompt=prompt, max_tokens=2), timeout=60))
    scraper.wait_for("llmesh_engine_prefix_cache_queries_total",
                     lambda v: v - scraper.value("llmesh_engine_prefix_cache_queries_total", before, model=model)
                     >= 80, model=model)
    after = scraper.samples()
    assert _delta(before, after, "llmesh_engine_prefix_cache_queries_total", scraper, model=model) == 80
    assert _delta(before, after, "llmesh_engine_prefix_cache_hits_total", scraper, model=model) == 32


def test_finish_reasons_stop_length_and_abort_are_counted_apart(engine):
    stub, scraper, model = engine
    first = list(stub.Generate(_request("probe", max_tokens=3), timeout=60))
    stop_token = [t for c in first for t in c.token_ids][1]
    before = scraper.samples()
    out = list(stub.Generate(_request("stops", max_tokens=10, stop_token_ids=[stop_token]), timeout=60))
    assert out[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    cancelled = stub.Generate(_request("abandoned", max_tokens=400), timeout=60)
    next(cancelled)
    cancelled.cancel()
    scraper.wait_for("llmesh_engine_request_success_total",
                     lambda v: v > scraper.value("llmesh_engine_request_success_total", before, model=model,
                                                 finished_reason="abort"), model=model, finished_reason="abort")
    after = scraper.samples()
    for reason, n in (("stop", 1), ("abort", 1), ("length", 0)):
        assert _delta(before, after, "llmesh_engine_request_success_total", scraper, model=model,
                      finished_reason=reason) == n, reason


def test_preemptions_are_counted_when_the_kv_cache_is_too_small(engine):
    stub, scraper, model = engine
    before = scraper.samples()
    # Three requests of 18 + 40 tokens need 4 blocks each; the 8 blocks hold two.
    streams = [stub.Generate(_request(f"pre-{i}", max_tokens=40), timeout=120) for i in range(3)]
    for s in streams:
        assert sum(len(c.token_ids) for c in s) == 40
    scraper.wait_for("llmesh_engine_request_success_total",
                     lambda v: v - scraper.value("llmesh_engine_request_success_total", before, model=model,
                                                 finished_reason="length") == 3,
                     model=model, finished_reason="length")
    after = scraper.samples()
    assert _delta(before, after, "llmesh_engine_num_preemptions_total", scraper, model=model) >= 1
    assert scraper.wait_for("llmesh_engine_kv_cache_usage_perc", lambda v: v == 0, model=model) == 0
