"""llmesh.kernels: Triton kernels, each beside its torch reference (see README.md).

Importing this package imports nothing else: the torch backend uses only
`paged_attention` (plain torch), and Triton loads with the first kernel module imported.
"""
