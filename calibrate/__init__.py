"""Calibration data, the layer-by-layer capture pipeline and the statistics methods consume."""
