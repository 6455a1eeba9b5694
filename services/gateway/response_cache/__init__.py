"""The gateway's response cache: repeated deterministic requests answered from Redis.

``store``: tenant-scoped bytes with a TTL, every call bounded (reusable for other
answers, e.g. embeddings). ``key``: what makes two requests the same. ``policy``: the
API key's setting and the request's mode. ``codec``: a stream's messages as bytes.
``revision``: a model's identity on disk. ``cache``: the lookup, replay and store around
one Generate/Chat stream. ``embedding_cache``: the same for
embeddings, input by input. docs/response-cache.md explains the whole.
"""
