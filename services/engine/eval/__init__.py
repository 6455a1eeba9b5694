"""Model quality measurements run through the engine's own forward pass (perplexity)."""
