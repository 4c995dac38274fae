"""`serve`: an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models) in front of one loaded model.

Every option is checked before the model loads (`error: ...` and exit status 2, as the app's), and the address
is bound then too, so a port in use fails in a second, not after the model has loaded.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from vtw_core.cli.args import add_model_options, at_least, load_model, port_number
from vtw_core.errors import VTWError


def milliseconds(text: str) -> float:
    """A finite number of milliseconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fill_milliseconds(text: str) -> float:
    """Milliseconds a batch may wait to fill: 0 to MAX_BATCH_FILL_MS."""
    from vtw_core.serve.limits import MAX_BATCH_FILL_MS

    value = milliseconds(text)
    if value > MAX_BATCH_FILL_MS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_BATCH_FILL_MS:g} ms, got {text}")
    return value


def megabytes(text: str) -> int:
    """A size in MB (2**20 bytes), > 0, as bytes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MB") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of MB > 0, got {text}")
    return int(value * 2**20)


def domains(text: str) -> frozenset[str]:
    from vtw_core.serve.remote_images import parse_domains

    try:
        return parse_domains(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def origins(text: str) -> list[str]:
    """`https://a.example,http://localhost:3000` -> the origins (scheme://host[:port], no path), as browsers send."""
    found = [origin.strip().rstrip("/") for origin in text.split(",") if origin.strip()]
    for origin in found:
        scheme, separator, rest = origin.partition("://")
        if origin != "*" and (scheme not in ("http", "https") or not separator or not rest or "/" in rest):
            raise argparse.ArgumentTypeError(f"{origin!r} is not an origin such as https://app.example.com")
    return found


def host_names(text: str) -> list[str]:
    """`api.example.com,gpu-box` -> the names (no scheme, port or path), or ["*"]."""
    found = [name.strip().lower() for name in text.split(",") if name.strip()]
    for name in found:
        if name != "*" and any(character in name for character in "/ @"):
            raise argparse.ArgumentTypeError(f"{name!r} is not a host name such as api.example.com")
    if not found:
        raise argparse.ArgumentTypeError("name at least one host, or * for any")
    return found


def add_parser(subparsers: Any) -> None:
    from vtw_core.serve.limits import DEFAULT_BATCH_FILL_MS, DEFAULT_LIMITS, MAX_IMAGES_PER_REQUEST

    limits = DEFAULT_LIMITS
    parser = subparsers.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions, /v1/models)")
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 1 to 65535 (default 8000)")
    parser.add_argument("--served-model-name", help="the id clients pass as `model` (default: from --model)")
    parser.add_argument("--method", default="default",
                        help="method when a request names none: default (vtw:auto where the checkpoint ships a K, "
                             "else baseline), baseline, vtw:K, fastv:K:R, schedule:NAME")  # fmt: skip
    parser.add_argument("--prefill-engine", choices=["plain", "compiled", "tuned"], default="plain",
                        help="compiled: the prefill's layer loop, the decode step and a CLIP or SigLIP vision tower "
                             "through torch.compile (on a CPU ~10%% faster prefill, 0.7x the time per token); "
                             "tuned: compiled, with the matmuls as inductor's CPU templates on weights frozen into "
                             "the graphs (on the default model a further 0.83-0.93x prefill of one prompt, 0.5-0.7x "
                             "per decode step; ~2x the compile time, a packed copy of the weights per graph). Both "
                             "compile for the baseline and the default method before listening (minutes the first "
                             "time); docs/engines.md")  # fmt: skip
    parser.add_argument("--cpus",
                        help="pin the thread(s) that compute to these cores (Linux), e.g. 1, 2-3 or 0,2; the "
                             "server's HTTP threads stay free (default: $VTW_CPUS if set, else no pinning; "
                             "docs/engines.md, Threads)")  # fmt: skip
    parser.add_argument("--max-batch-size", type=at_least(1), default=8,
                        help="requests per engine call (1: no batching)")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=milliseconds, default=0.0,
                        help="how long a batch waits for more requests after its first (default 0: it takes "
                             "those already waiting when the device frees)")  # fmt: skip
    parser.add_argument("--batch-fill-ms", type=fill_milliseconds, default=DEFAULT_BATCH_FILL_MS,
                        help="how long a batch may wait for requests the load of the last second says are coming "
                             "(clients sending their next request as soon as one is answered); one client alone "
                             f"never waits (default {DEFAULT_BATCH_FILL_MS:g}; 0: never; docs/serving.md)")  # fmt: skip
    parser.add_argument("--max-queue", type=at_least(1), default=64,
                        help="requests waiting (reading and decoding images too) before answering 503")  # fmt: skip
    parser.add_argument("--max-images-per-request", type=at_least(0), default=MAX_IMAGES_PER_REQUEST,
                        help=f"images in one request, all its messages together (default {MAX_IMAGES_PER_REQUEST},"
                             " the app's per-turn limit)")  # fmt: skip
    parser.add_argument("--max-image-bytes", type=megabytes, default=limits.max_image_bytes,
                        help=f"MB per image as sent (default {limits.max_image_bytes / 2**20:g}); the body limit "
                             "follows from it")  # fmt: skip
    parser.add_argument("--max-pixels-per-request", type=at_least(1), default=limits.max_pixels,
                        help=f"decoded pixels of a request's images together, read from their headers before "
                             f"decoding (default {limits.max_pixels:,}); each image also at most "
                             f"{limits.max_image_pixels:,}")  # fmt: skip
    parser.add_argument("--max-decoding", type=at_least(1), default=2,
                        help="requests decoding images at the same time (default 2)")  # fmt: skip
    parser.add_argument("--max-image-memory", type=megabytes,
                        help="MB that the images of all admitted requests may hold (encoded + 3 bytes per pixel; "
                             "default: --max-batch-size requests at the image limits)")  # fmt: skip
    parser.add_argument("--api-key",
                        help="require `Authorization: Bearer KEY` on every route but /health (default: $VTW_API_KEY "
                             "if set, else no key)")  # fmt: skip
    parser.add_argument("--allowed-origins", type=origins, default=[],
                        help="comma-separated web origins whose pages may call the API from a browser (CORS); "
                             "default none")  # fmt: skip
    parser.add_argument("--allowed-hosts", type=host_names, default=None,
                        help="comma-separated host names the server answers to besides localhost, 127.0.0.1 and "
                             "[::1] (a reverse proxy's public name), or * for any; default: only those three on "
                             "a loopback --host, any on others")  # fmt: skip
    parser.add_argument("--docs", action="store_true", help="serve the API's /docs, /redoc and /openapi.json pages")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="also read http(s) image URLs (public addresses only; the server fetches what "
                             "clients name)")  # fmt: skip
    parser.add_argument("--allowed-media-domains", type=domains, default=frozenset(),
                        help="with --allow-remote-images: the only hosts image URLs may name, comma-separated "
                             "(default: any host with public addresses)")  # fmt: skip
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.runtime import resolve_cpus
    from vtw_core.serve.auth import api_key_from
    from vtw_core.serve.limits import RequestLimits
    from vtw_core.serve.standalone import bind_socket, serve

    if args.allowed_media_domains and not args.allow_remote_images:
        raise VTWError("--allowed-media-domains needs --allow-remote-images")
    limits = RequestLimits(max_images=args.max_images_per_request, max_image_bytes=args.max_image_bytes,
                           max_pixels=args.max_pixels_per_request)  # fmt: skip
    if args.max_image_memory is not None and args.max_image_memory < limits.max_image_memory:
        raise VTWError(f"--max-image-memory must hold one request at the image limits: at least "
                       f"{-(-limits.max_image_memory // 2**20)} MB")  # fmt: skip
    compute_cpus = resolve_cpus(args.cpus, args.process.threads)
    sock = bind_socket(args.host, args.port)  # before the model loads: a port in use fails now
    manager = load_model(args, prefill_engine=args.prefill_engine)
    serve(manager, host=args.host, port=args.port, model_id=args.served_model_name, method=args.method,
          max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
          batch_fill_ms=args.batch_fill_ms, max_queue=args.max_queue,
          allow_remote_images=args.allow_remote_images, allowed_media_domains=args.allowed_media_domains,
          limits=limits, max_decoding=args.max_decoding, max_image_memory=args.max_image_memory,
          api_key=api_key_from(args.api_key), allowed_origins=args.allowed_origins, docs=args.docs,
          allowed_hosts=args.allowed_hosts, compute_cpus=compute_cpus, sock=sock)  # fmt: skip
