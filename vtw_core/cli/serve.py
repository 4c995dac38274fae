"""`serve`: an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models) in front of one loaded model."""

from __future__ import annotations

import argparse
from typing import Any

from vtw_core.cli.args import add_model_options, load_model


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions, /v1/models)")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the id clients pass as `model` (default: from --model)")
    parser.add_argument("--method", default="default",
                        help="method when a request names none: default (vtw:auto where the checkpoint ships a K, "
                             "else baseline), baseline, vtw:K, fastv:K:R, schedule:NAME")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per engine call (1: no batching)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="also read http(s) image URLs (the server then fetches what clients name)")  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.serve.standalone import serve

    serve(load_model(args), host=args.host, port=args.port, model_id=args.served_model_name, method=args.method,
          max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
          allow_remote_images=args.allow_remote_images)  # fmt: skip
