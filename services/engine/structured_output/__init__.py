"""Structured output: generation constrained by a grammar (JSON schema, regex, choice, EBNF).

``spec`` holds what a request asks for (torch-free: the gateway and the proto conversion
use it); ``grammar`` turns a spec into an xgrammar grammar, checked at the front end and
compiled once per spec in the core; ``state`` is one request's matcher, which fills its
row of the token bitmask each step and advances with each token the request receives.
"""
