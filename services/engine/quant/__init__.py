"""Quantized weights: formats, quantize-on-load, checkpoint converters and the linear layer
that multiplies by them (see packed.py for the layouts)."""
