"""NVRTC compiles of the CUDA C++ kernels (llmesh/kernels/cuda/) on any machine, GPU or not, and
cuobjdump's resource report of each: what the compile tests assert on (no local memory, registers)."""

from __future__ import annotations

from pathlib import Path

import pytest


def compiled_report(source_file: str, name: str, tmp_path: Path, arch: str = "sm_90"
                    ) -> tuple[bytes, str, dict[str, int]]:
    """(cubin, lowered name, resource report) of template instance ``name`` of ``source_file``;
    skips the test where NVRTC or cuobjdump is not installed."""
    from llmesh.kernels import cuda_rtc

    try:
        cuda_rtc.nvrtc()
    except cuda_rtc.RtcError as e:
        pytest.skip(str(e))
    cubin, lowered = cuda_rtc.compile_cubin(cuda_rtc.source(source_file), name, arch)
    report = cuda_rtc.resource_usage(cubin, tmp_path)
    if report is None:
        pytest.skip("no cuobjdump here (it comes with Triton's NVIDIA backend)")
    return cubin, lowered, report


def machine_code(cubin: bytes, tmp_path: Path) -> str:
    """nvdisasm's listing of a cubin (skips where no nvdisasm is at hand: it comes with Triton's
    NVIDIA backend)."""
    import subprocess

    from llmesh.kernels import cuda_rtc

    tool = cuda_rtc.binary_tool("nvdisasm")
    if tool is None:
        pytest.skip("no nvdisasm here (it comes with Triton's NVIDIA backend)")
    path = tmp_path / "listing.cubin"
    path.write_bytes(cubin)
    return subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, timeout=60, check=True).stdout


def global_loads(listing: str) -> dict[str, int]:
    """The global loads of a machine-code listing (``machine_code``) by form (nvdisasm's LDG opcodes
    with their modifiers, e.g. ``LDG.E.NA.128.CONSTANT``: ld.global.nc with L1::no_allocate):
    CONSTANT is the read-only path, which may serve what a kernel still running under PDL has not
    written yet."""
    import collections
    import re

    return dict(collections.Counter(re.findall(r"\b(LDG\.[A-Z0-9.]+)", listing)))


def weight_loads_before_wait(listing: str) -> int:
    """The weight-stream loads (L1::no_allocate) a listing places before the kernel's last PDL wait
    (griddepcontrol.wait is ACQBULK in the machine code)."""
    return listing[:listing.rindex("ACQBULK")].count("LDG.E.NA.128.CONSTANT")
