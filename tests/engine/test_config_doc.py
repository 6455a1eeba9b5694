"""docs/configuration.md lists the options the dataclasses declare, as they declare them."""

from __future__ import annotations

from llmesh.config import options
from llmesh.engine import config_doc
from llmesh.engine.config import EngineConfig


def test_configuration_doc_is_current():
    text = config_doc.DOC.read_text()
    assert config_doc.render(text) == text, "docs/configuration.md is stale: run python -m llmesh.engine.config_doc"


def test_engine_table_has_a_row_per_option_with_its_default():
    rows = config_doc.engine_table().splitlines()[2:]
    assert [r.split("|")[1].strip(" `") for r in rows] == list(options(EngineConfig))
    row = next(r for r in rows if r.startswith("| `gpu_memory_utilization`"))
    assert "`--gpu-memory-utilization`" in row and "`LLMESH_ENGINE_GPU_MEMORY_UTILIZATION`" in row
    assert "| `0.9` |" in row
