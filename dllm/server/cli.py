"""`dllm serve MODEL [options]`: load the model once, then serve it over the OpenAI API with uvicorn.

Importing this module costs only argparse (`dllm generate` must not load FastAPI); `run_serve` checks that
the `server` extra is installed and says how to install it when it is not.
"""
from __future__ import annotations

import argparse
import logging
import os

from dllm.errors import DllmError

logger = logging.getLogger("dllm.server")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from dllm.cli import _engine_options  # the same model and engine options as `dllm generate`

    p = subparsers.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                              description="OpenAI-compatible server: /v1/chat/completions, /v1/completions "
                                          "(streaming by SSE), /v1/models, /health, /metrics.")
    _engine_options(p, model_positional=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 for every interface. Default: 127.0.0.1")
    g.add_argument("--port", type=int, default=8000, help="TCP port. Default: 8000")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="when nothing decodes, how long the first arrival may wait for company (up to "
                        "--max-batch-size requests) before decoding starts; while others decode, arrivals start at "
                        "the next step. Default: 10")
    g.add_argument("--max-queue-size", type=int, default=256,
                   help="most requests (one per choice) waiting for a slot; more are answered 429. Default: 256")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="most tokens of prompt + max_tokens a request may take; longer ones are answered 400. "
                        "Default: the model's context")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="most canvas columns (prompt + max_tokens, doubled with cfg_scale, summed over rows) the "
                        "decoding requests hold: bounds their memory; a request over it alone is answered 400. "
                        "Default: 2 x --max-batch-size x --max-model-len")
    g.add_argument("--max-num-cohorts", type=int, default=None,
                   help="most cohorts (requests admitted together with the same settings; each runs its own "
                        "forward every step) decoding at once; later arrivals wait for one to end. Bounds the "
                        "time a step takes under mixed settings. Default: no bound")
    g.add_argument("--api-key", default=os.environ.get("DLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health. Default: $DLLM_API_KEY, "
                        "else no key")
    g.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="the model name clients send in 'model' and /v1/models lists (repeat the option for "
                        "aliases). Default: MODEL as given")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds to let in-flight requests finish; then each is answered 503 "
                        "(a stream: an error event, then [DONE]) and the server exits 0. Default: 30")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level. Default: info")
    g.add_argument("--load-format", default="safetensors", choices=("safetensors", "dummy"),
                   help="dummy: random weights in the checkpoint's shape (config.json alone suffices), for load "
                        "tests and benchmarks. Default: safetensors")
    g.add_argument("--skip-tokenizer-init", action="store_true",
                   help="load no tokenizer: prompts must be token ids (/v1/completions) and answers carry no text, "
                        "only usage and (with return_token_ids) token ids")
    return p


def run_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from dllm.server.app import build_app
        from dllm.server.engine_client import EngineClient
    except ImportError:
        raise DllmError("dllm serve needs the server extra: pip install 'dllm[server]'") from None
    _check(args)
    from dllm.cli import build_llm
    logging.getLogger("dllm.server").setLevel(args.log_level.upper())
    llm = build_llm(args)
    client = EngineClient(llm, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                          max_queue_size=args.max_queue_size, max_model_len=args.max_model_len,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_num_cohorts=args.max_num_cohorts)
    names = args.served_model_name or [args.model]
    app = build_app(client, names, api_key=args.api_key, shutdown_timeout_s=args.shutdown_timeout)
    logger.info("serving %s as %s on http://%s:%d/v1 (cache=%s, strategy=%s, max batch %d, max wait %g ms%s)",
                args.model, ", ".join(names), args.host, args.port, args.cache, args.strategy, args.max_batch_size,
                args.max_wait_ms, ", API key required" if args.api_key else "")
    # uvicorn's own graceful timeout is a backstop: the engine client answers everything 503 at --shutdown-timeout
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + _SHUTDOWN_GRACE_S)
    _draining_server(config, client, args.shutdown_timeout).run()


_SHUTDOWN_GRACE_S = 5.0


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose shutdown first drains the engine client (503s past the timeout) and which
        exits normally (status 0) after a signal instead of re-raising it."""

        def __init__(self, config, client, timeout_s: float):
            super().__init__(config)
            self.client, self.timeout_s = client, timeout_s

        async def shutdown(self, sockets=None) -> None:
            import asyncio
            drain = asyncio.ensure_future(self.client.drain(self.timeout_s))
            await super().shutdown(sockets)
            clean = await drain
            logger.info("shutdown %s", "complete: every request finished" if clean else
                        "complete: requests past the timeout were answered 503")
            self._captured_signals.clear()  # a handled SIGTERM is a clean exit, not death by signal

    return DrainingServer


def _draining_server(config, client, timeout_s: float):
    return _draining_server_class()(config, client, timeout_s)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise DllmError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1 or args.max_queue_size < 1:
        raise DllmError("--max-batch-size and --max-queue-size must be positive")
    if args.max_wait_ms < 0 or args.shutdown_timeout < 0:
        raise DllmError("--max-wait-ms and --shutdown-timeout must be >= 0")
    for name in ("max_model_len", "max_num_batched_tokens", "max_num_cohorts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DllmError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        raise DllmError("--api-key is empty; give a key or leave the option out")
