"""Console-exported spans in a supervised child's log (``OTEL_TRACES_EXPORTER=console``, how
bench/mesh_trace.py reads a mesh's spans): a real child process under llmesh.supervisor.Child,
the launcher's arrangement (stdout copied into the log line by line, stderr appended to it
directly), emitting spans while another thread logs. Every span must come back whole: log
lines landing inside a span's multi-line JSON lost spans when they were printed to stdout."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from llmesh.supervisor import Child, RestartPolicy

ROOT = Path(__file__).resolve().parents[1]
SPANS = 1000

CHILD = f"""
import logging, threading
from llmesh.logs import setup_logging
from llmesh.telemetry import setup_tracing
from opentelemetry import trace

setup_logging("console-test")
provider = setup_tracing("console-test")
log = logging.getLogger("console-test")
stop = threading.Event()

def chatter():
    while not stop.is_set():
        log.info("a line between spans", extra={{"pad": "x" * 200}})

t = threading.Thread(target=chatter)
t.start()
tracer = trace.get_tracer("console-test")
for i in range({SPANS}):
    with tracer.start_as_current_span(f"span-{{i}}") as span:
        span.set_attribute("i", i)
print("LLMESH_READY console-test", flush=True)
provider.force_flush()
stop.set()
t.join()
provider.shutdown()
"""


@pytest.mark.timeout(120)
def test_every_console_span_reaches_the_log_whole(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from mesh_trace import read_spans

    log_path = tmp_path / "child.log"
    child = Child("console-test", log_path, RestartPolicy())
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "20",
           "PYTHONPATH": str(ROOT)}
    env.pop("OTEL_SDK_DISABLED", None)
    child.spawn([sys.executable, "-c", CHILD], env, stdout_has_ready_line=True)
    deadline = time.monotonic() + 90
    while child.exited() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert child.exited() == 0, child.log_tail()
    time.sleep(0.5)  # the copy thread's last lines
    names = sorted(int(s["name"].split("-")[1]) for s in read_spans(log_path) if s["name"].startswith("span-"))
    assert names == list(range(SPANS)), f"{SPANS - len(names)} spans lost or cut"
