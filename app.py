"""Start the VTW Chat web app: `python app.py [--model ID_OR_PATH] [--host H] [--port P] [--share]`.

With `--backend-url URL` the answers come from an OpenAI-compatible VTW server instead of a model loaded here.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    from vtw_core.cli.args import at_least, port_number  # light: argument types only

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=os.environ.get("VTW_MODEL"), help="hub id or local folder (or VTW_MODEL)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=port_number, default=os.environ.get("GRADIO_SERVER_PORT", "7860"))
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    parser.add_argument("--device", default=os.environ.get("VTW_DEVICE", "auto"), help="auto, cpu, cuda")
    parser.add_argument("--dtype", default=os.environ.get("VTW_DTYPE", "auto"), help="auto, bfloat16, ...")
    parser.add_argument("--attention", default=os.environ.get("VTW_ATTENTION", "auto"), help="auto, sdpa, eager, ...")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--threads", type=at_least(1),
                        help="torch CPU threads (default 1, or $VTW_THREADS; docs/engines.md)")  # fmt: skip
    parser.add_argument(
        "--backend-url",
        default=os.environ.get("VTW_BACKEND_URL"),
        help="answer through an OpenAI-compatible VTW server (python -m vtw_core serve, Ray Serve) instead of "
        "loading the model here (or VTW_BACKEND_URL)",
    )
    parser.add_argument(
        "--backend-api-key",
        help="the API key of the server at --backend-url, for servers started with --api-key (or VTW_API_KEY)",
    )
    args = parser.parse_args()

    from app.ui import build_demo
    from app.ui.page import serve
    from vtw_core.errors import VTWError
    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.defaults import require_model

    try:
        if args.backend_url:
            from app.remote import RemoteManager
            from vtw_core.serve.auth import api_key_from

            manager = RemoteManager(args.backend_url, api_key=api_key_from(args.backend_api_key))
            demo = build_demo(manager, banner=f"Answers come from the server at {manager.base_url}.")
            serve(demo, args.host, args.port, args.share)
            return 0
        from vtw_core.runtime import configure_process, release_openmp_threads

        # One thread unless asked (both sides of a turn then meet the same machine), and one malloc pool that keeps
        # freed pages, so the side that runs first does not pay the page faults the other one skips.
        configure_process(args.threads)
        manager = ModelManager.load(
            require_model(args.model),
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            trust_remote_code=args.trust_remote_code,
        )
    except VTWError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo = build_demo(manager)
    release_openmp_threads()  # the page's worker threads compute from now on, not the one that warmed up
    try:
        serve(demo, args.host, args.port, args.share)
    except OSError as error:  # the port is taken, or the host cannot be bound
        print(f"error: cannot serve on {args.host}:{args.port} ({error}); pick another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
