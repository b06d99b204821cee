#!/usr/bin/env bash
# The default recipe on SmolLM2 with its quality gate: exits 1 when the quantized model fails it.
EXTRAS="[dev]" source "$(dirname "$0")/setup.sh"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
qtool quantize smollm2-135m -o "$out/ckpt" --recipe recipes/w4a16-awq-g64.yaml --check
