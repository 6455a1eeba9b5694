"""Transport between the front end and the engine-core process, measured on this machine.

The engine core sends one message per step holding every running request's new tokens;
the front end sends small commands (add, abort, utility calls). For each transport a
child process (spawned, as the real core is) plays the core:

* ``rtt_small_us``: a small command and its small reply, there and back (p50, p99);
* ``step_rtt_us``: a "step" command answered by one message of ``--batch`` outputs of one
  token each, decoded into the engine's own ``EngineCoreOutput`` objects (p50);
* ``stream_outputs_per_s``: the child sends ``--messages`` such messages back to back and the
  parent decodes them all: the most outputs/s the link carries.

Transports: multiprocessing ``Pipe`` and ``Queue`` with pickle; pyzmq PUSH/PULL over ipc://
with pickle or msgspec (only where pyzmq / msgspec are installed); ``Pipe`` + msgspec to
separate the socket from the codec. Writes bench/results/ipc_transport_<device>.json.

    python bench/ipc_transport.py [--batch 256] [--messages 2000] [--smoke]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import statistics
import sys
import tempfile
import time

from llmesh.bench_results import write_result
from llmesh.engine.core.messages import EngineCoreOutput, UtilityResult

STEP, SMALL, STREAM, STOP = "step", "small", "stream", "stop"


def _outputs(batch: int) -> list[EngineCoreOutput]:
    return [EngineCoreOutput(request_id=f"chatcmpl-{i:024x}", new_token_ids=[1000 + i], num_cached_tokens=16)
            for i in range(batch)]


# ---- codecs ---------------------------------------------------------------------------------
class PickleCodec:
    name = "pickle"

    def encode(self, obj) -> bytes:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def decode_outputs(self, data: bytes) -> list[EngineCoreOutput]:
        return pickle.loads(data)

    def decode_small(self, data: bytes):
        return pickle.loads(data)


class MsgspecCodec:
    """msgspec encodes the same dataclasses natively; decoding is typed."""

    name = "msgspec"

    def __init__(self) -> None:
        import msgspec

        self._enc = msgspec.msgpack.Encoder()
        self._outputs = msgspec.msgpack.Decoder(list[EngineCoreOutput])
        self._small = msgspec.msgpack.Decoder()

    def encode(self, obj) -> bytes:
        return self._enc.encode(obj)

    def decode_outputs(self, data: bytes) -> list[EngineCoreOutput]:
        return self._outputs.decode(data)

    def decode_small(self, data: bytes):
        return self._small.decode(data)


# ---- links: send bytes / receive bytes ------------------------------------------------------
class PipeLink:
    def __init__(self, recv_conn, send_conn) -> None:
        self.r, self.s = recv_conn, send_conn

    def send(self, data: bytes) -> None:
        self.s.send_bytes(data)

    def recv(self) -> bytes:
        return self.r.recv_bytes()


class QueueLink:
    def __init__(self, recv_q, send_q) -> None:
        self.r, self.s = recv_q, send_q

    def send(self, data: bytes) -> None:
        self.s.put(data)

    def recv(self) -> bytes:
        return self.r.get()


class ZmqLink:
    def __init__(self, recv_path: str, send_path: str, bind: bool) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.r, self.s = self.ctx.socket(zmq.PULL), self.ctx.socket(zmq.PUSH)
        for sock, path in ((self.r, recv_path), (self.s, send_path)):
            sock.setsockopt(zmq.LINGER, 0)
            (sock.bind if bind else sock.connect)(f"ipc://{path}")

    def send(self, data: bytes) -> None:
        self.s.send(data, copy=False)

    def recv(self) -> bytes:
        return self.r.recv(copy=False).buffer


def _make_codec(name: str):
    return PickleCodec() if name == "pickle" else MsgspecCodec()


def _child(kind: str, codec_name: str, endpoints, batch: int) -> None:
    """The stand-in core: answers commands until told to stop."""
    if kind == "zmq":
        link = ZmqLink(endpoints[1], endpoints[0], bind=False)
    elif kind == "pipe":
        link = PipeLink(endpoints[1], endpoints[2])
    else:
        link = QueueLink(endpoints[1], endpoints[2])
    codec = _make_codec(codec_name)
    outputs = _outputs(batch)
    while True:
        cmd = codec.decode_small(link.recv())
        op = cmd[0] if isinstance(cmd, (list, tuple)) else cmd
        if op == STOP:
            return
        if op == SMALL:
            link.send(codec.encode(UtilityResult(call_id=cmd[1], result=cmd[1])))
        elif op == STEP:
            link.send(codec.encode(outputs))
        elif op == STREAM:
            for _ in range(cmd[1]):
                link.send(codec.encode(outputs))


def _measure(kind: str, codec_name: str, batch: int, messages: int, rounds: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="llmesh-ipc-")
    if kind == "zmq":
        to_parent, to_child = os.path.join(tmp, "up"), os.path.join(tmp, "down")
        parent = ZmqLink(to_parent, to_child, bind=True)
        endpoints = (to_parent, to_child)
    elif kind == "pipe":
        up_r, up_s = ctx.Pipe(duplex=False)
        down_r, down_s = ctx.Pipe(duplex=False)
        parent = PipeLink(up_r, down_s)
        endpoints = (None, down_r, up_s)
    else:
        up, down = ctx.Queue(), ctx.Queue()
        parent = QueueLink(up, down)
        endpoints = (None, down, up)
    proc = ctx.Process(target=_child, args=(kind, codec_name, endpoints, batch), daemon=True)
    proc.start()
    codec = _make_codec(codec_name)
    try:
        small = []
        for i in range(rounds):
            t0 = time.perf_counter()
            parent.send(codec.encode((SMALL, i)))
            codec.decode_small(parent.recv())
            small.append(time.perf_counter() - t0)
        step = []
        for _ in range(max(rounds // 4, 10)):
            t0 = time.perf_counter()
            parent.send(codec.encode((STEP,)))
            got = codec.decode_outputs(parent.recv())
            step.append(time.perf_counter() - t0)
            assert len(got) == batch and isinstance(got[0], EngineCoreOutput)
        t0 = time.perf_counter()
        parent.send(codec.encode((STREAM, messages)))
        for _ in range(messages):
            codec.decode_outputs(parent.recv())
        stream_s = time.perf_counter() - t0
        sample = _outputs(batch)
        encoded = codec.encode(sample)
        encode_s = _time(lambda: codec.encode(sample), 200)
        decode_s = _time(lambda: codec.decode_outputs(encoded), 200)
        parent.send(codec.encode((STOP,)))
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    small.sort()
    step.sort()
    return {
        "rtt_small_p50_us": 1e6 * statistics.median(small),
        "rtt_small_p99_us": 1e6 * small[int(0.99 * (len(small) - 1))],
        "step_rtt_p50_us": 1e6 * statistics.median(step),
        "step_outputs_per_s": batch / statistics.mean(step),
        "stream_outputs_per_s": batch * messages / stream_s,
        "encode_batch_us": 1e6 * encode_s,
        "decode_batch_us": 1e6 * decode_s,
    }


def _time(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="outputs per step message")
    ap.add_argument("--messages", type=int, default=2000, help="messages in the streaming run")
    ap.add_argument("--rounds", type=int, default=2000, help="round trips timed per transport")
    ap.add_argument("--smoke", action="store_true", help="a few rounds, no result file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.messages, args.rounds = 20, 40
    variants = [("pipe", "pickle"), ("queue", "pickle")]
    if _available("msgspec"):
        variants.append(("pipe", "msgspec"))
    if _available("zmq"):
        variants.append(("zmq", "pickle"))
        if _available("msgspec"):
            variants.append(("zmq", "msgspec"))
    metrics: dict[str, float] = {}
    for kind, codec in variants:
        res = _measure(kind, codec, args.batch, args.messages, args.rounds)
        print(f"{kind:>5} + {codec:<7} " + "  ".join(f"{k}={v:,.1f}" for k, v in res.items()), flush=True)
        metrics.update({f"{kind}_{codec}_{k}": v for k, v in res.items()})
    if not args.smoke:
        import torch  # noqa: F401  (device_tag reads it)
        from llmesh.bench_results import device_tag

        path = write_result(f"ipc_transport_{device_tag('cpu')}", {
            "batch_outputs_per_message": args.batch, "messages": args.messages, "rounds": args.rounds,
            "variants": [f"{k}+{c}" for k, c in variants],
            "versions": {m: _version(m) for m in ("zmq", "msgspec") if _available(m)}}, metrics)
        print(f"wrote {path}")
    return 0


def _version(module: str) -> str:
    mod = __import__(module)
    return getattr(mod, "__version__", None) or str(getattr(mod, "pyzmq_version", lambda: "?")())


if __name__ == "__main__":
    sys.exit(main())
