"""qtool: offline LLM weight quantization, packed checkpoints, and a runtime that measures them.

The root package holds only what every subpackage shares: the error type and the registry.
"""

__version__ = "0.1.0"

from qtool.errors import QtoolError

__all__ = ["QtoolError", "__version__"]
