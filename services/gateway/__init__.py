"""llmesh.gateway: the public Inference API.

Authenticates the caller (``caller``), validates each request before any engine work
(``validation``), tokenizes it once with the model's tokenizer and chat template
(``tokenizers``), routes it through the router and streams the tokens back
(``servicer``), and records usage (``usage``, ``metrics``). It never imports torch.
"""
