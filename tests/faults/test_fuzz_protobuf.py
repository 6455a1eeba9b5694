"""Fuzzed requests against every public method of every llmesh service, as real processes.

The methods are enumerated from the generated protos' service descriptors, so a method
added to a .proto is fuzzed without touching this file (and a service no process is known
to serve fails ``test_every_public_method_is_fuzzed``). Raw bytes go through a real gRPC
channel with no serializer (see ``_fuzz_wire``): random bytes, truncated messages,
out-of-range values, wrong wire types, long strings, repetition, deep nesting. Every
answer must be a clean status (never UNKNOWN or INTERNAL, which mean a handler crashed;
never a hang: every call has a deadline); afterwards every process is alive and SERVING,
a normal request through the gateway still succeeds and the engine holds no KV block.
The HTTP front gets malformed JSON bodies over a raw socket, with the same demands.

Cases are seeded: ``LLMESH_FUZZ_CASES`` sets the number per method (default 150), and a
failure prints the (method, case) pair that replays it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Iterator

import grpc
import pytest

from llmesh.v1 import (common_pb2, engine_pb2, inference_pb2, inference_pb2_grpc, prefix_index_pb2,
                       router_pb2)
from tests.faults._fuzz_wire import WireFuzzer
from tests.faults._robustness_helpers import (MODEL, assert_serving, robust_mesh, wait_engine_idle)

CASES = int(os.environ.get("LLMESH_FUZZ_CASES", "150"))
CALL_TIMEOUT_S = 20.0
"""Per call; a call still unanswered after it is a hang (2 CPU cores under a full fuzz load)."""
CONCURRENCY = 12
READ_AT_MOST = 3
"""Stream messages read before the client cancels (a fuzzed request may ask for many tokens)."""
CLEAN_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
               grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}
"""What a refused request may end with. UNKNOWN and INTERNAL mean an exception escaped a
handler (a bug), DEADLINE_EXCEEDED a hang, UNAVAILABLE a crash or a dead downstream."""
PROTO_MODULES = (inference_pb2, router_pb2, engine_pb2, prefix_index_pb2)


def public_methods() -> Iterator[tuple[str, object]]:
    """(full service name, MethodDescriptor) of every llmesh.v1 method."""
    for module in PROTO_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield service.full_name, method


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    with robust_mesh(tiny_llama, tmp_path_factory.mktemp("fuzz-mesh")) as m:
        yield m


async def _call(channel: grpc.aio.Channel, service: str, method, data: bytes) -> tuple[grpc.StatusCode, str]:
    """Send ``data`` as the request of ``method``; the final status (OK when it answered, or
    when it streamed and this client cancelled after READ_AT_MOST messages)."""
    path = f"/{service}/{method.name}"
    try:
        if method.client_streaming:
            # One message per call: grpc.aio's client turns a write that races the server's
            # end of the call into its own INTERNAL status, hiding the server's answer.
            call = channel.stream_stream(path)(iter([data]), timeout=CALL_TIMEOUT_S)
        elif method.server_streaming:
            call = channel.unary_stream(path)(data, timeout=CALL_TIMEOUT_S)
        else:
            await channel.unary_unary(path)(data, timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK, ""
        for _ in range(READ_AT_MOST):
            if await call.read() is grpc.aio.EOF:
                break
        call.cancel()
        code = await call.code()
        return (grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code), await call.details() or ""
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""


async def _fuzz(addresses: dict[str, str], methods: list[tuple[str, object]]) -> tuple[list[str], dict]:
    channels = {s: grpc.aio.insecure_channel(a, options=[("grpc.max_send_message_length", 64 << 20)])
                for s, a in addresses.items()}
    gate = asyncio.Semaphore(CONCURRENCY)
    failures: list[str] = []
    outcomes: dict[str, dict[str, int]] = {}

    async def one(service: str, method, i: int) -> None:
        rng = random.Random(f"{service}/{method.name}#{i}")
        kind, data = WireFuzzer(method.input_type).case(rng)
        async with gate:
            code, details = await _call(channels[service], service, method, data)
        counts = outcomes.setdefault(f"{service}/{method.name}", {})
        counts[code.name] = counts.get(code.name, 0) + 1
        if code != grpc.StatusCode.OK and (code not in CLEAN_CODES or "Traceback" in details):
            failures.append(f"{service}/{method.name} case {i} ({kind}, {len(data)} bytes): "
                            f"{code.name}: {details[:300]}")

    try:
        await asyncio.gather(*(one(s, m, i) for s, m in methods for i in range(CASES)))
    finally:
        for ch in channels.values():
            await ch.close()
    return failures, outcomes


def _grouped(failures: list[str]) -> str:
    """One line per distinct failure (the first case that shows it, and how many more do)."""
    groups: dict[str, list[str]] = {}
    for f in failures:
        where, _, what = f.partition(": ")
        key = where.split(" case ")[0] + " " + what[:90]
        groups.setdefault(key, []).append(f)
    return "\n".join(f"{fs[0][:400]}  (+{len(fs) - 1} alike)" for fs in groups.values())


def test_every_public_method_is_fuzzed(mesh):
    """Each llmesh.v1 service a process serves (by reflection) is one the protos declare and
    this file sends to: a new service or method cannot slip past the fuzzer."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    declared = {s for s, _ in public_methods()}
    assert declared == set(mesh.grpc_services()), "a service in the protos has no process in the fuzz mesh"
    for name, proc in mesh.grpc_services().items():
        served = {s for s in ProtoReflectionDescriptorDatabase(grpc.insecure_channel(proc.address)).get_services()
                  if s.startswith("llmesh.")}
        assert served == {name}, f"{proc.address} serves {served}, the fuzzer expects {name}"


def test_fuzzed_protobuf_bytes_get_clean_statuses_from_every_method(mesh):
    methods = list(public_methods())
    addresses = {s: p.address for s, p in mesh.grpc_services().items()}
    failures, outcomes = asyncio.run(_fuzz(addresses, methods))
    assert not failures, f"{len(failures)} unclean answers (of {CASES} per method):\n" + _grouped(failures)
    for name, counts in outcomes.items():
        assert sum(counts.values()) == CASES, (name, counts)
    # Some fuzzed requests get past validation into generation, so that path is fuzzed too.
    for name in ("llmesh.v1.Inference/Generate", "llmesh.v1.Router/Generate", "llmesh.v1.Engine/Generate"):
        assert outcomes[name].get("OK", 0) > 0, (name, outcomes[name])
    for name, proc in mesh.processes().items():
        assert proc.alive(), f"{name} died under fuzzing:\n{proc.log_tail()}"


def _http_cases(rng: random.Random) -> tuple[str, bytes]:
    """(path, body) of one malformed or hostile request to the OpenAI front."""
    path = rng.choice(["/v1/chat/completions", "/v1/completions"])
    chat = path.endswith("chat/completions")
    body: dict = {"model": MODEL, "max_tokens": rng.randint(1, 4)}
    body.update({"messages": [{"role": "user", "content": "hello there"}]} if chat else {"prompt": "hello there"})
    weird = [None, True, False, -1, 0, 2**31, 2**64, 10**40, -(10**40), 1.5, -0.0, 1e308, "", "x" * 5000,
             "🦊", [], [1, "a", None], {}, {"a": {"b": []}}, [[[]]], [-1, 2**40], {"role": 1}]
    keys = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
            "min_p", "seed", "stop", "stream", "stream_options", "n", "logprobs", "top_logprobs", "stop_token_ids",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "user", "echo",
            "response_format", "tools", "logit_bias", "ignore_eos", "no_such_field"]
    kind = rng.randrange(9)
    if kind == 0:
        return path, rng.randbytes(rng.randint(0, 200))
    if kind == 1:
        text = json.dumps(body)
        return path, text[: rng.randint(0, len(text) - 1)].encode()
    if kind == 2:
        depth = rng.choice([100, 5000, 100_000])
        return path, ("[" * depth + "]" * depth).encode() if rng.random() < 0.5 else \
            ('{"model": ' + '{"a": ' * depth + "1" + "}" * depth + "}").encode()
    if kind == 3:
        return path, json.dumps(rng.choice([[], "text", 3, None, [body]])).encode()
    if kind == 4:  # raw numbers Python's json turns into inf or huge ints
        key = rng.choice(["temperature", "top_p", "max_tokens", "seed", "top_k", "presence_penalty"])
        text = json.dumps(body)[:-1] + f', "{key}": {rng.choice(["1e400", "-1e400", "1" + "0" * 400, "NaN"])}}}'
        return path, text.encode()
    if kind == 5:
        return path, json.dumps(body).encode()[:-1] + b', "model": "\xff\xfe"}'
    if kind == 6 and chat:
        body["messages"] = [{"role": rng.choice(["user", "system", "tool", "", 7]),
                             "content": rng.choice(weird)} for _ in range(rng.randint(0, 300))]
        return path, json.dumps(body).encode()
    for _ in range(rng.randint(1, 4)):
        body[rng.choice(keys)] = rng.choice(weird)
    if rng.random() < 0.2:
        body["stream"] = True
    return path, json.dumps(body).encode()


async def _http_one(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    """POST over a raw socket; the status and (for errors) the body. A 200 is not read to
    the end: closing the connection cancels the generation, as a departing client does."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CALL_TIMEOUT_S)
        status = int(head.split(b" ", 2)[1])
        rest = b"" if status == 200 else await asyncio.wait_for(reader.read(), CALL_TIMEOUT_S)
        return status, rest
    finally:
        writer.close()


def test_malformed_json_bodies_get_clean_http_errors(mesh):
    async def run() -> list[str]:
        gate, failures = asyncio.Semaphore(CONCURRENCY), []

        async def one(i: int) -> None:
            path, body = _http_cases(random.Random(f"http#{i}"))
            async with gate:
                status, rest = await _http_one(mesh.http_port, path, body)
            if status >= 500 or status not in (200, 400, 404, 413, 422, 429):
                failures.append(f"http case {i} {path} ({len(body)} bytes): {status} {rest[:300]!r}")
            elif status != 200:
                payload = rest.split(b"\r\n\r\n", 1)[-1]
                try:
                    error = json.loads(payload)["error"]
                    assert error["message"]
                except (ValueError, KeyError, TypeError, AssertionError):
                    failures.append(f"http case {i}: {status} without an OpenAI error body: {payload[:200]!r}")

        await asyncio.gather(*(one(i) for i in range(2 * CASES)))
        return failures

    failures = asyncio.run(run())
    assert not failures, f"{len(failures)} unclean HTTP answers:\n" + _grouped(failures)
    assert mesh.gateway.alive(), mesh.gateway.log_tail()


def test_each_crash_the_fuzzer_found_is_now_a_clean_refusal(mesh):
    """The fuzzer's findings, replayed deterministically: bytes that are no valid message
    (UNKNOWN with a Python exception before), a heartbeat TTL Redis cannot store
    (UNAVAILABLE before), JSON nested past the parser's depth and an integer past a float
    in a float field (HTTP 500 before)."""
    async def grpc_answers() -> list[tuple[str, grpc.StatusCode, str]]:
        out = []
        for service, method in public_methods():
            async with grpc.aio.insecure_channel(mesh.grpc_services()[service].address) as ch:
                out.append((f"/{service}/{method.name}", *await _call(ch, service, method, b"\xff\xff\xff")))
        return out

    for path, code, details in asyncio.run(grpc_answers()):
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "Error parsing message" in details, (path, code, details)
    from llmesh.v1 import prefix_index_pb2_grpc

    index = prefix_index_pb2_grpc.PrefixIndexStub(grpc.insecure_channel(mesh.index.address))
    for ttl in (1e30, float("inf"), float("nan"), -1.0):
        with pytest.raises(grpc.RpcError) as e:
            index.Heartbeat(prefix_index_pb2.HeartbeatRequest(instance_id="x", namespace=MODEL, ttl_seconds=ttl),
                            timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ttl_seconds" in e.value.details()

    async def http_answers() -> list[tuple[int, bytes]]:
        bodies = [b"[" * 100_000 + b"]" * 100_000,
                  b'{"model": "tiny", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}"]
        return [await _http_one(mesh.http_port, "/v1/completions", body) for body in bodies]

    for status, rest in asyncio.run(http_answers()):
        assert status == 400 and b'"error"' in rest, (status, rest[-300:])


def test_after_fuzzing_every_service_serves_and_no_kv_block_is_held(mesh):
    """Runs last in this file: whatever the fuzz tests sent, the mesh is whole afterwards."""
    for name, proc in mesh.processes().items():
        assert proc.alive(), f"{name} died:\n{proc.log_tail()}"
        assert_serving(proc.address, name)
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(mesh.gateway.address))
    chunks = list(stub.Generate(inference_pb2.GenerateRequest(
        model=MODEL, text="the quick brown fox", sampling=common_pb2.SamplingParams(
            max_tokens=5, temperature=0.0, ignore_eos=True)), timeout=60))
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    load = wait_engine_idle(mesh.engine.address)
    assert load.kv_blocks_total == 64
