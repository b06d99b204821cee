"""Quantization algorithms and formats: schemes, grids, methods, packing, checkpoint writers and readers."""
