"""`distillkit serve-teacher`: serve a trained model as a black-box teacher over HTTP (extra `serve`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve-teacher` subcommand."""
    p = subparsers.add_parser(
        "serve-teacher",
        help="serve a trained model as a black-box teacher API (needs the `serve` extra)",
        description=(
            "Serve RUN_DIR|CKPT on POST /v1/predict (npy or JSON images in [0, 1]), GET /v1/info and "
            "GET /healthz, with bearer API keys (create them with `distillkit teacher-keys add`; "
            "revoked or added keys take effect without a restart) and per-key image budgets "
            "persisted in --state, charged only for delivered answers; an Idempotency-Key header "
            "makes retries free. SIGINT/SIGTERM shut down gracefully."
        ),
    )
    p.add_argument("target", metavar="RUN_DIR|CKPT", help="run directory or checkpoint to serve")
    p.add_argument("--responses", default="soft", help="soft | hard | topk:K (default soft)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keys", default="teacher_keys.json", help="keys file (hashed keys)")
    p.add_argument("--budget", type=int, help="images per key for keys without their own budget")
    p.add_argument("--max-batch", type=int, default=256, help="most images per request")
    p.add_argument("--max-body-bytes", type=int, help="request body limit (413 above)")
    p.add_argument("--state", default="teacher_state.db", help="SQLite file of spent budgets")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--log-file", help="access log (JSON lines); default stderr")
    p.add_argument(
        "--idempotency-ttl",
        type=float,
        default=86400.0,
        help="seconds an answer stays replayable under its Idempotency-Key (default 86400)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="concurrent connections before new requests get 503 (default 64)",
    )
    p.add_argument(
        "--read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a whole request; slower connections are closed",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=int,
        default=5,
        help="seconds an idle kept-alive connection stays open (default 5)",
    )
    p.set_defaults(func=cmd_serve_teacher)


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    """Run the server until interrupted."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print(
            "serve-teacher needs FastAPI and uvicorn: pip install 'distillkit[serve]'",
            file=sys.stderr,
        )
        return 2
    from distillkit.teachers.server import ServerSettings, parse_responses, serve

    parse_responses(args.responses)
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.budget is not None and args.budget < 0:
        raise ValueError(f"--budget must be >= 0, got {args.budget}")
    names = ("idempotency_ttl", "max_connections", "read_timeout", "keep_alive_timeout")
    limits = {name: getattr(args, name) for name in names}
    for name, value in limits.items():
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    settings = ServerSettings(
        max_batch=args.max_batch,
        max_body_bytes=args.max_body_bytes,
        default_budget=args.budget,
        **limits,
    )
    handler: logging.Handler = (
        logging.FileHandler(args.log_file) if args.log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("distillkit.serve", "distillkit.serve.access"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    logging.getLogger("distillkit.serve.access").propagate = False
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler
    # that was installed before it; a no-op handler here makes a requested stop exit 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    serve(
        args.target,
        responses=args.responses,
        host=args.host,
        port=args.port,
        keys_file=args.keys,
        state=args.state,
        device=args.device,
        settings=settings,
    )
    return 0
