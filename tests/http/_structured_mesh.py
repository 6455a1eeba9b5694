"""A mesh for the structured-output and tool tests: two tiny random-weight models, one with
Qwen2.5's chat template and one with Llama 3.1's, behind the router and a gateway with its
HTTP front (no auth). Random weights are fine: the grammars force the outputs checked."""

from __future__ import annotations

import contextlib
import shutil

import openai
import yaml

from tests.fixtures.tool_templates import LLAMA31_CHAT_TEMPLATE, QWEN25_CHAT_TEMPLATE, set_chat_template
from tests.mesh_helpers import ServiceProcess, free_port, start_engine

QWEN, LLAMA = "tiny-qwen", "tiny-llama31"
WINDOW = 1024


@contextlib.contextmanager
def structured_mesh(tiny_model_dirs: dict[str, str], run_dir):
    dirs = {QWEN: shutil.copytree(tiny_model_dirs["qwen2"], run_dir / "qwen"),
            LLAMA: shutil.copytree(tiny_model_dirs["llama"], run_dir / "llama")}
    set_chat_template(str(dirs[QWEN]), QWEN25_CHAT_TEMPLATE)
    set_chat_template(str(dirs[LLAMA]), LLAMA31_CHAT_TEMPLATE)
    with contextlib.ExitStack() as stack:
        engines = {name: stack.enter_context(start_engine(
            str(path), "--served-model-name", name, "--num-kv-blocks", "256", "--max-model-len", str(WINDOW)))
            for name, path in dirs.items()}
        models_file = run_dir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"default_model": QWEN, "models": [
            {"name": name, "path": str(dirs[name]), "addresses": [engines[name].address]} for name in dirs]}))
        router = stack.enter_context(ServiceProcess("llmesh.router.main", ["--models-file", str(models_file)]))
        http_port = free_port()
        gateway = stack.enter_context(ServiceProcess("llmesh.gateway.main", [
            "--router", router.address, "--models-file", str(models_file), "--no-auth",
            "--http-port", str(http_port)]))
        yield {"gateway": gateway, "base_url": f"http://127.0.0.1:{http_port}/v1"}


def sdk(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh["base_url"], api_key="unused", max_retries=0, timeout=120)
