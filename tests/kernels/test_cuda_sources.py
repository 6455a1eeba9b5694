"""cuda_rtc.source: the one string NVRTC compiles for a kernel file (common.cuh, the file, its
headers put in place of their #include lines), with #line markers that number every line as its
own file's, so a compile error names the right file and line. Pure text: runs anywhere."""

from __future__ import annotations

import re

import pytest

from llmesh.kernels import cuda_rtc

KERNEL_FILES = sorted(p.name for p in cuda_rtc.SOURCES.glob("*.cu"))


def _located(text: str) -> list[tuple[str, int, str]]:
    """(file, line number, text) of each line of an expanded source, as #line markers number them
    (lines before the first marker are the prelude's, from 1)."""
    out, name, number = [], cuda_rtc.PRELUDE, 1
    for line in text.split("\n"):
        marker = re.fullmatch(r'#line (\d+) "([\w.]+)"', line)
        if marker:
            name, number = marker[2], int(marker[1])
            continue
        out.append((name, number, line))
        number += 1
    return out


@pytest.mark.parametrize("kernel_file", KERNEL_FILES)
def test_every_line_of_the_compiled_text_is_its_files_line(kernel_file):
    text = cuda_rtc.source(kernel_file)
    assert not re.search(r"^\s*#include", text, re.M), "an #include NVRTC would have to resolve"
    files: dict[str, list[str]] = {}
    seen = set()
    for name, number, line in _located(text):
        lines = files.setdefault(name, (cuda_rtc.SOURCES / name).read_text().split("\n"))
        if line == "" and number == len(lines) + 1:
            continue  # the newline closing a header, before the marker back into the file
        assert 1 <= number <= len(lines), (name, number)
        assert lines[number - 1] == line or lines[number - 1].startswith("#include"), (name, number, line)
        seen.add((name, number))
    for name, lines in files.items():  # each file's every line once (an include line stands for its header)
        missing = {n for n in range(1, len(lines) + 1) if lines[n - 1].strip()} - {n for f, n in seen if f == name}
        assert all(lines[n - 1].startswith("#include") for n in missing), (name, sorted(missing)[:5])


def test_the_mma_kernel_takes_its_ptx_wrappers_from_the_header():
    text = cuda_rtc.source("w4a16_mma.cu")
    header = (cuda_rtc.SOURCES / "ptx.cuh").read_text()
    assert header.strip() in text
    assert text.index("mma.sync.aligned") < text.index("w4a16_mma(")  # defined before the kernel uses it
    assert text.count("__device__ __forceinline__ u32 smem_addr(") == 1
