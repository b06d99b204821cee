"""Whether the batch-1 drift (step_drift.py) is the GPU's clocks: the batch-1 decode step fresh, after
a load of 32 requests of 128 + 256 tokens, after 20 s and 60 s idle and after a second such load, with
nvidia-smi's SM and memory clocks, temperature, power and throttle reasons before and after each.
Results: step_drift_h200_clocks.json (runtime_h200.md, "One process's batch-1 step moves by 6%").

usage: python benchmarks/step_drift_clocks.py OUT.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_drift import OUTPUT, PROMPT, batch1_step  # noqa: E402

from qtool.runtime.bench import run_load, synthetic_config, synthetic_model  # noqa: E402
from qtool.runtime.engine import Engine  # noqa: E402

QUERY = "clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active"


def gpu_state() -> str:
    return subprocess.run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()


def main() -> None:
    model = synthetic_model(synthetic_config("llama3-8b"), 4, 64, torch.float16, "cuda")
    engine = Engine(model, None, "cuda", torch.float16, max_sequences=32, max_batched_tokens=2048)
    run_load(engine, 1, PROMPT, OUTPUT, seed=1)  # compiles, tunes, captures
    points = {}

    def point(label: str) -> None:
        before = gpu_state()
        rate, ms = batch1_step(engine)
        points[label] = dict(decode_tokens_per_s=rate, gpu_step_ms=ms, gpu_before=before, gpu_after=gpu_state())
        print(f"{label}: {rate:.1f} tok/s, GPU step {ms:.3f} ms | {before} | {points[label]['gpu_after']}", flush=True)

    point("fresh")
    point("fresh again")
    run_load(engine, 32, 128, 256, seed=1)
    point("after 32x128x256")
    time.sleep(20)
    point("after 20 s idle")
    time.sleep(60)
    point("after 60 s more idle")
    run_load(engine, 32, 128, 256, seed=2)
    point("after a second 32x128x256")
    Path(sys.argv[1]).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), query=QUERY, points=points),
                                            indent=1))


if __name__ == "__main__":
    main()
