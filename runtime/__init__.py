"""Load quantized checkpoints and run them: model resolution, loader, QuantLinear, evaluation."""
