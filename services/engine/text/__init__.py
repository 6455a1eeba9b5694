"""Text handling: tokenizer, chat templates, streaming detokenization and stop strings."""

from llmesh.engine.text.chat_template import render_chat_template
from llmesh.engine.text.detokenizer import IncrementalDetokenizer
from llmesh.engine.text.stop import StopResult, StopStringMatcher
from llmesh.engine.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopResult", "StopStringMatcher", "Tokenizer", "render_chat_template"]
