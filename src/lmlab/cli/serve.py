"""`lmlab serve`: an OpenAI-compatible server for a model folder (the `serve` extra)."""

from __future__ import annotations

import argparse
import os

from lmlab.cli.generate import add_decoding_flags
from lmlab.cli.output import console
from lmlab.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model folder over OpenAI's API, with continuous batching")
    p.add_argument("--model", required=True, help="model folder with its tokenizer")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--api-key", default=os.environ.get("LMLAB_API_KEY"), help="require this bearer key")
    p.add_argument("--max-batch", type=int, default=8, help="rows in the running decode batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per engine step")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 beyond)")
    p.add_argument(
        "--read-timeout", type=float, default=30.0, help="seconds a client may stall while sending its body (408)"
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="seconds a connection has to send a request's headers, from when it opens or its last answer "
        "ends (408, then closed; 0: no limit)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. https://app.example; repeatable; * for any) call the API "
        "from a browser (default: none, CORS off)",
    )
    add_decoding_flags(p)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores but one for the HTTP loop; all of them under 4 cores)",
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from lmlab.serve.app import ServeConfig, create_app
        from lmlab.serve.connections import uvicorn_config
    except ImportError as e:
        raise ConfigError(f"lmlab serve needs the serve extra: pip install 'lmlab[serve]' ({e})") from None
    from lmlab.quantize import decoding_choice

    cores = os.cpu_count() or 1
    # a core for the HTTP loop once there are cores to spare; on 2 cores both go to torch, which
    # decoded 8 concurrent streams 1.18x faster than 1 torch thread (docs/benchmarks.md, serving)
    threads = args.threads or (cores - 1 if cores >= 4 else cores)
    choice = decoding_choice(args.dtype, args.quantize)
    cfg = ServeConfig(
        model=args.model,
        name=args.name,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        max_body=args.max_body,
        read_timeout=args.read_timeout,
        header_timeout=args.header_timeout,
        cors_origins=args.cors_origin,
        dtype=choice["dtype"],
        quantize=choice["quantize"],
        threads=threads,
    )
    layers = f" with {choice['quantize']} linear layers" if choice["quantize"] != "none" else ""
    console.print(
        f"serving {args.model} on http://{args.host}:{args.port}: decoding in {choice['dtype']}"
        f"{layers} ({choice['why']}), {threads} torch threads, "
        f"batch {args.max_batch}, queue {args.max_queue}{', API key required' if args.api_key else ''})",
        highlight=False,
    )
    config = uvicorn_config(create_app(cfg), args.host, args.port, cfg.header_timeout, log_level="warning")
    uvicorn.Server(config).run()
