"""`qtool serve`: an OpenAI-compatible server over qtool's runtime; `--smoke` checks one end to end."""

from __future__ import annotations

import os
import sys

from qtool.calibrate.kv_scales import kv_cache_dtype as kv_cache_dtype_of
from qtool.cli import console
from qtool.cli.devices import choose_device, choose_dtype
from qtool.errors import FAILURE, QtoolError


def run_serve(checkpoint: str, host: str, port: int, api_key: str | None, smoke: bool, smoke_requests: int,
              device: str | None, dtype: str | None, trust_remote_code: bool, quiet: bool,
              kv_cache_dtype: str = "auto") -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise QtoolError("qtool serve needs FastAPI and uvicorn: pip install 'qtool[serve]'") from None
    if not 0 < port < 65536:
        raise QtoolError(f"--port must be from 1 to 65535, got {port}")
    if smoke_requests < 1:
        raise QtoolError(f"--smoke-requests must be at least 1, got {smoke_requests}")
    kv_cache_dtype_of(kv_cache_dtype)
    from qtool.runtime.async_engine import AsyncEngine
    from qtool.runtime.engine import LLM
    from qtool.runtime.server import create_app, serve

    api_key = api_key or os.environ.get("QTOOL_API_KEY") or None
    device = choose_device(device)
    console.quiet_libraries()
    with console.working("loading", checkpoint, not quiet):
        llm = LLM(checkpoint, device, choose_dtype(dtype, device), trust_remote_code, kv_cache_dtype)
    engine = AsyncEngine(llm.engine)
    app = create_app(engine, llm.tokenizer, checkpoint, api_key)
    try:
        if smoke:
            from qtool.runtime.smoke import BackgroundServer, run_smoke

            with BackgroundServer(app) as server:
                report = run_smoke(server.url, checkpoint, smoke_requests, api_key=api_key)
            print(report.line())
            for failure in report.failures:
                print(f"  {failure}", file=sys.stderr)
            if report.failures:
                raise SystemExit(FAILURE)
            return
        print(f"qtool serve: {checkpoint} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
        serve(app, host, port)
    finally:
        engine.close(timeout=30)
