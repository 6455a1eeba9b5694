"""CUDA C++ kernels compiled at run time by NVRTC and launched through the driver API.

Our kernels are Triton's, except where a kernel needs what Triton does not let us place: the
tensor-core fragment layout of a weight that is never staged in shared memory (w4a16_mma.py).
Those are CUDA C++ sources in llmesh/kernels/cuda/ (also the one-token MoE layer, moe_gemv.py),
written with no CUDA headers (inline PTX for what they would give; our own shared headers,
common.cuh and ptx.cuh, go in as text: ``source``), so NVRTC, which ships with PyTorch's CUDA
wheels and with every CUDA toolkit, compiles one in well under a second on the machine that
runs it, for its own GPU: no build step, no toolkit, nothing to package but the sources.
``Kernel`` is one compiled function; a launch goes onto PyTorch's current stream, so CUDA
graphs capture it like any other kernel.

The two libraries are found by ctypes: libcuda (the driver, present wherever a GPU is) and
libnvrtc (PyTorch's own, then the CUDA toolkit's, then a pip ``nvidia-cuda-nvrtc``).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

SOURCES = Path(__file__).resolve().parent / "cuda"
PRELUDE = "common.cuh"
"""What every source in SOURCES starts from (`source`): the helpers the kernels share."""


_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"$', re.M)
"""A header of SOURCES a source names (one level: a header includes none)."""


def source(source_file: str) -> str:
    """The text NVRTC compiles for llmesh/kernels/cuda/``source_file``: common.cuh, then the
    file with each ``#include "x.cuh"`` line replaced by that header's text (NVRTC is given no
    include path: everything it compiles is this one string), every line numbered as its own
    file's in NVRTC's messages."""
    text = (SOURCES / source_file).read_text()
    parts, last = [(SOURCES / PRELUDE).read_text(), f'\n#line 1 "{source_file}"\n'], 0
    for m in _INCLUDE.finditer(text):
        after = text.count("\n", 0, m.start()) + 2  # the number of the line after the include
        parts += [text[last:m.start()], f'#line 1 "{m[1]}"\n', (SOURCES / m[1]).read_text().rstrip("\n") + "\n",
                  f'#line {after} "{source_file}"']
        last = m.end()
    parts.append(text[last:])
    return "".join(parts)


class RtcError(RuntimeError):
    """A CUDA C++ kernel could not be compiled or launched here (the message says which and why)."""


def _nvrtc_candidates() -> list[str]:
    names = []
    for major in ("13", "12"):
        names.append(f"libnvrtc.so.{major}")
    names.append("libnvrtc.so")
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    roots += [os.path.join(p, "nvidia") for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]
    for root in filter(None, roots):
        names += sorted(glob.glob(os.path.join(root, "**", "libnvrtc.so*"), recursive=True))
    return names


@functools.cache
def nvrtc() -> ctypes.CDLL:
    """libnvrtc, or RtcError naming where it was looked for."""
    tried = []
    for name in _nvrtc_candidates():
        if "builtins" in name or ".alt." in name:
            continue
        try:
            if os.path.isabs(name):  # NVRTC opens its builtins by name: found once loaded
                for builtins in sorted(glob.glob(os.path.join(os.path.dirname(name), "libnvrtc-builtins.so*"))):
                    if ".alt." not in builtins:
                        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(name)
        except OSError:
            tried.append(name)
    raise RtcError("NVRTC (libnvrtc) not found: install PyTorch's CUDA wheel, a CUDA toolkit or "
                   f"'pip install nvidia-cuda-nvrtc' (looked for {', '.join(tried[:4])}, ...)")


@functools.cache
def _cuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RtcError(f"the CUDA driver (libcuda.so.1) is not loadable here: {e}") from e


def _check(result: int, what: str) -> None:
    if result:
        msg = ctypes.c_char_p()
        _cuda().cuGetErrorString(result, ctypes.byref(msg))
        raise RtcError(f"{what}: CUDA error {result} ({(msg.value or b'?').decode()})")


def compile_cubin(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """NVRTC's machine code for ``source`` on ``arch`` (e.g. "sm_90") and the lowered name of
    ``name`` (a kernel, or a template instance such as ``"f<1, 2>"``). Needs no GPU."""
    lib = nvrtc()
    prog = ctypes.c_void_p()

    def ok(result: int, what: str) -> None:
        if result:
            lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise RtcError(f"NVRTC {what} of {name}: {lib.nvrtcGetErrorString(result).decode()}")

    ok(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name.split('<')[0]}.cu".encode(), 0,
                              None, None), "create")
    try:
        ok(lib.nvrtcAddNameExpression(prog, name.encode()), "name")
        opts = [f"--gpu-architecture={arch}", "--std=c++17", "-default-device", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if result:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RtcError(f"NVRTC could not compile {name} for {arch}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        ok(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        ok(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        ok(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), "lowered name")
        return cubin.raw, (lowered.value or b"").decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def binary_tool(name: str) -> str | None:
    """The path of a CUDA binary utility (cuobjdump, nvdisasm): on PATH, else the copy Triton's
    NVIDIA backend carries, else None."""
    import shutil

    tool = shutil.which(name)
    if tool is not None:
        return tool
    try:
        import triton
    except ImportError:
        return None
    candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(candidate) if candidate.exists() else None


def resource_usage(cubin: bytes, workdir: Path) -> dict[str, int] | None:
    """cuobjdump's resource report of a cubin's kernel (REG, STACK, SHARED, LOCAL, ...), or None
    where no cuobjdump is at hand (Triton's NVIDIA backend carries one)."""
    import re
    import subprocess

    tool = binary_tool("cuobjdump")
    if tool is None:
        return None
    path = Path(workdir) / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b([A-Z]+)(?:\[\d+\])?:(\d+)", text.split("Function", 1)[-1])}


def device_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _LaunchAttribute(ctypes.Structure):  # cuda.h CUlaunchAttribute: id, pad to 8, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("value_pad", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # cuda.h CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


@dataclass
class Kernel:
    """One compiled kernel, loaded on one device."""

    name: str
    device: torch.device
    function: ctypes.c_void_p
    module: ctypes.c_void_p
    shared_limit: int = 48 * 1024
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def launch(self, grid: tuple[int, int, int], block: int, shared: int, args: list, *, pdl: bool = False) -> None:
        """Launch on PyTorch's current stream of the kernel's device. ``args`` are tensors
        (passed as pointers), ints (C int) or ``ctypes`` values, in the kernel's order.

        ``pdl``: programmatic dependent launch (Hopper; common.pdl_launch says when): the
        blocks may become resident while the previous kernel drains, so the kernel must run
        ``griddepcontrol.wait`` before it touches memory that kernel writes."""
        if shared > self.shared_limit:
            with self._lock:
                if shared > self.shared_limit:
                    _check(_cuda().cuFuncSetAttribute(self.function, _MAX_DYNAMIC_SHARED, shared),
                           f"{self.name}: {shared} bytes of shared memory")
                    self.shared_limit = shared
        held = []
        for a in args:
            if isinstance(a, torch.Tensor):
                held.append(ctypes.c_void_p(a.data_ptr()))
            elif isinstance(a, bool) or not isinstance(a, int):
                held.append(a)
            else:
                held.append(ctypes.c_int(a))
        ptrs = (ctypes.c_void_p * len(held))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in held])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not pdl:
            _check(_cuda().cuLaunchKernel(self.function, *grid, block, 1, 1, shared, ctypes.c_void_p(stream), ptrs,
                                          None), f"launch of {self.name}")
            return
        attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(block, 1, 1), shared,
                               ctypes.c_void_p(stream), ctypes.pointer(attr), 1)
        _check(_cuda().cuLaunchKernelEx(ctypes.byref(config), self.function, ptrs, None),
               f"launch of {self.name} (programmatic dependent launch)")


_LOADED: dict[tuple, Kernel] = {}
_LOAD_LOCK = threading.Lock()


def load(source_file: str, name: str, device: torch.device, options: tuple[str, ...] = ()) -> Kernel:
    """``name`` from llmesh/kernels/cuda/``source_file``, compiled for ``device``'s GPU (once per
    process and device; NVRTC takes 0.2-0.3 s for w4a16_mma)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (source_file, name, index, options)
    kernel = _LOADED.get(key)  # a launch's lookup: no file read
    if kernel is None:
        kernel = _LOADED[key] = load_source(source(source_file), name, device, options)
    return kernel


def load_source(source: str, name: str, device: torch.device, options: tuple[str, ...] = ()) -> Kernel:
    """``name`` from the CUDA C++ text ``source`` (benchmarks' variants of a kernel), compiled
    for ``device``'s GPU once per process, device and text."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (source, name, index, options)
    kernel = _LOADED.get(key)
    if kernel is not None:
        return kernel
    with _LOAD_LOCK:
        if (kernel := _LOADED.get(key)) is not None:
            return kernel
        dev = torch.device("cuda", index)
        cubin, lowered = compile_cubin(source, name, device_arch(dev), options)
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(dev):
            torch.empty(1, device=dev)  # the device's primary context exists and is current
            _check(_cuda().cuModuleLoadData(ctypes.byref(module), cubin), f"loading {name}")
            _check(_cuda().cuModuleGetFunction(ctypes.byref(function), module, lowered.encode()),
                   f"finding {name}")
        kernel = _LOADED[key] = Kernel(name, dev, function, module)
        return kernel
