"""A progress bar over the tensors of a checkpoint, shared by the HF and GGUF loaders.

Loading a large model takes long enough that a silent process looks hung, so every load
logs one line up front and draws a tqdm bar on stderr when a person is watching (a tty).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

log = logging.getLogger("llmesh.engine.loader")


def tensor_progress(items: Iterable[T], total: int, source: str) -> Iterator[T]:
    """Yield ``items`` while logging "loading N tensors from X" and drawing a bar."""
    log.info("loading %d tensors from %s", total, source)
    bar = tqdm(items, total=total, desc="loading tensors", unit="tensor", file=sys.stderr,
               disable=not sys.stderr.isatty(), leave=False)
    try:
        yield from bar
    finally:
        bar.close()
