#!/usr/bin/env bash
# Set up, quantize SmolLM2-135M with the default recipe (RTN W4 g64 asymmetric) and compare it with
# the fp16 model on WikiText-2 (40 windows of 2048 tokens, fp32 on the CPU).
EXTRAS="" source "$(dirname "$0")/setup.sh"
qtool quantize smollm2-135m -o out/smollm2-135m-w4g64 --overwrite
qtool eval out/smollm2-135m-w4g64 --ppl wikitext --compare smollm2-135m --max-windows 40
