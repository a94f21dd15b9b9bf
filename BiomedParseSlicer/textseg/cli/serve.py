"""``textseg serve``: run the inference server (see docs/server.md).

    textseg serve                                   # 127.0.0.1:8765, no key needed on loopback
    textseg serve --host 0.0.0.0 --api-key-file /etc/textseg.key --devices cuda:0,cuda:1 --preload deepbet
    textseg serve --host 0.0.0.0 --keys-file /etc/textseg/keys    # one key per client, operators as admin
    textseg serve --ray --ray-replicas 4            # workers as a Ray Serve deployment
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..errors import TextsegError, UsageError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run the HTTP inference server", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else needs an API key)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--api-key", default=None,
                   help="one bearer key all clients send (default: $TEXTSEG_API_KEY); at least 16 random characters")
    p.add_argument("--api-key-file", default=None, help="read the key from this file (keeps it out of `ps`)")
    p.add_argument("--keys-file", default=None,
                   help="per-client keys, one 'NAME KEY [user|admin]' a line: each client sees only its own jobs and "
                        "images; admins see (and may cancel) every job")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices, one worker process each (default: every CUDA GPU, else one cpu "
                        "worker)")
    p.add_argument("--workers", type=int, default=None,
                   help="number of worker processes on --devices' first device (default 1)")
    p.add_argument("--preload", default="", help="comma-separated model ids to load at start")
    p.add_argument("--queue-size", type=int, default=16,
                   help="jobs waiting beyond the running ones; more get 429 (default 16)")
    p.add_argument("--session-ttl", type=float, default=3600.0,
                   help="seconds an uploaded image is kept after its last use")
    p.add_argument("--result-ttl", type=float, default=3600.0, help="seconds a finished job's result is kept")
    p.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest accepted image, decoded (MiB)")
    p.add_argument("--max-results", type=int, default=100, help="finished jobs kept per client; the oldest go first")
    p.add_argument("--max-results-mb", type=float, default=4096.0,
                   help="result files kept per client (MiB); the oldest go first")
    p.add_argument("--max-images-mb", type=float, default=8192.0,
                   help="uploaded images kept per client (MiB, decoded); its least recently used go first")
    p.add_argument("--heartbeat-timeout", type=float, default=120.0,
                   help="seconds a worker may be silent before it counts as hung: its job fails, it is replaced (0: "
                        "off)")
    p.add_argument("--cancel-timeout", type=float, default=60.0,
                   help="seconds a cancelled job may take to stop before its worker is replaced")
    p.add_argument("--job-timeout", type=float, default=10800.0, help="longest a job may run, in seconds (0: no limit)")
    p.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a connection may take to send a request's headers, from its first byte or from "
                        "connecting (0: no limit); then it is closed")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may pause (and, past that, must average 16 KiB/s) before 408")
    p.add_argument("--work-dir", default=None, help="folder for uploads and results (default: a private temp folder)")
    p.add_argument("--weights-dir", default=None, help="model weights folder (default: the textseg cache)")
    p.add_argument("--ray", action="store_true",
                   help="run the workers as a Ray Serve deployment (pip install 'textseg[ray]')")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    p.add_argument("--ray-replicas", type=int, default=None, help="Ray worker replicas (default: one per GPU, else 1)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_run)
    return p


def _devices(arg: Optional[str], workers: Optional[int]) -> tuple[str, ...]:
    if arg:
        devs = tuple(d.strip() for d in arg.split(",") if d.strip())
    else:
        devs = ("cpu",)
        try:
            import torch

            if torch.cuda.is_available():
                devs = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        except ImportError:
            pass
    if workers:
        if workers < 1:
            raise UsageError("--workers must be at least 1.")
        devs = tuple(devs[i % len(devs)] for i in range(workers))
    return devs


def settings_from_args(args: argparse.Namespace):
    from ..remote.server import Settings, read_keys_file

    key = args.api_key if args.api_key is not None else os.environ.get("TEXTSEG_API_KEY") or None
    if args.api_key_file:
        try:
            key = open(args.api_key_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise UsageError(f"Cannot read --api-key-file {args.api_key_file}: {exc.strerror}.") from None
    keys = read_keys_file(args.keys_file) if args.keys_file else ()
    if keys and (args.api_key is not None or args.api_key_file):
        raise UsageError("Give either --api-key/--api-key-file or --keys-file, not both.")
    if keys:
        key = None  # TEXTSEG_API_KEY in the environment does not add a shared key to a keys file
    for name in ("queue_size", "port", "heartbeat_timeout", "cancel_timeout", "job_timeout", "header_timeout",
                 "body_timeout"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative.")
    if min(args.session_ttl, args.result_ttl, args.max_upload_mb, args.max_results, args.max_results_mb) <= 0:
        raise UsageError("--session-ttl, --result-ttl, --max-upload-mb, --max-results and --max-results-mb must be "
                         "positive.")
    if args.max_images_mb < args.max_upload_mb:
        raise UsageError(f"--max-images-mb ({args.max_images_mb:g}) must be at least --max-upload-mb "
                         f"({args.max_upload_mb:g}): a client must be able to keep the largest image it may upload.")
    ray_options = {"address": args.ray_address, "replicas": args.ray_replicas}
    return Settings(
        host=args.host, port=args.port, api_key=key, keys=keys, devices=_devices(args.devices, args.workers),
        preload=tuple(m.strip() for m in args.preload.split(",") if m.strip()), queue_size=args.queue_size,
        session_ttl=args.session_ttl, result_ttl=args.result_ttl, max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_results_per_client=args.max_results, max_result_bytes_per_client=int(args.max_results_mb * 2**20),
        max_volume_bytes_per_client=int(args.max_images_mb * 2**20),
        heartbeat_timeout=args.heartbeat_timeout, cancel_timeout=args.cancel_timeout, job_timeout=args.job_timeout,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
        work_dir=args.work_dir, weights_dir=args.weights_dir, ray=args.ray, ray_options=ray_options,
        log_level=args.log_level,
    )


def _run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("`textseg serve` needs the server extra: pip install 'textseg[server]'.") from None
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("`textseg serve --ray` needs Ray Serve: pip install 'textseg[ray]'.") from None
    from ..catalog import get_model
    from ..remote.server import run

    settings = settings_from_args(args)
    for m in settings.preload:
        get_model(m)  # unknown model ids fail here, with the list of known ones
    run(settings)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="textseg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TextsegError as exc:
        print(f"textseg serve: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
