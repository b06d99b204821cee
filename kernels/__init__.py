"""Triton kernels, each beside a plain-torch reference and a dispatcher (none yet: the reference path lives in qtool.runtime.quant_linear)."""
