"""`python -m pipeline serve EXPORT_DIR`: start (or join) Ray, deploy the export, wait for Ctrl-C.

    python -m pipeline serve runs/cache/export/<key>/model --port 8000
    python -m pipeline serve EXPORT_DIR --address auto        # on a running Ray cluster
    python -m pipeline serve EXPORT_DIR --local               # this process, no Ray: one machine

`--local` serves the same app (routes, scheduler, metrics) from uvicorn in this process: no Ray to
start and no proxy hop per request (docs/serving.md measures what that hop costs), but no cluster,
replicas or Ray dashboard either.

The export is checked here before Ray starts (a wrong path answers at once, not from a replica's
traceback). On a cluster, the export directory must be readable on the node that runs the replica.
"""
from __future__ import annotations

import logging
import sys
import time
import urllib.request
from pathlib import Path

APP_NAME = "twotower"


def check_export(export_dir: str) -> Path:
    """The export directory, or a FileNotFoundError naming what is missing."""
    export = Path(export_dir)
    for name in ("config.json", "model.safetensors"):
        if not (export / name).is_file():
            raise FileNotFoundError(f"{export}: not an export directory (no {name}); exports are written by "
                                    "the export stage under runs/cache/export/<key>/model")
    if not any((export / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{export}: the export has no tokenizer (tokenizer.json): the server needs one")
    return export.resolve()


def check_port(host: str, port: int) -> None:
    """An OSError naming the address when something already listens there (Ray Serve's proxy would
    otherwise retry in the background while the server never answers)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); "
                          "pick another --port") from None


def start(export_dir: str, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          **options) -> str:
    """Deploy the export on Ray Serve and return the server's base URL once it answers."""
    import ray
    from ray import serve

    from serving.app import application

    export = check_export(export_dir)
    if address is None:  # a local Ray: the proxy listens on this machine
        check_port(host, port)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(str(export), **options), name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    _wait_healthy(url)
    return url


class LocalServer:
    """The app on uvicorn in a thread of this process (`start_local`); `stop()` ends it."""

    def __init__(self, export_dir: str, host: str, port: int, **options):
        import threading

        import uvicorn

        from serving.app import Server, build_app

        check_port(host, port)
        app = build_app(Server(str(check_export(export_dir)), options))
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="twotower-http", daemon=True)
        self.thread.start()
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        _wait_healthy(self.url)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (5 s at most), then return."""
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():  # something still holds it: close regardless
            self.server.force_exit = True
            self.thread.join(timeout=10)


def _wait_healthy(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop(ray_too: bool = True) -> None:
    """Stop Serve (its proxy, controller and the replicas) and, unless `ray_too` is False, Ray."""
    import ray
    from ray import serve

    serve.shutdown()
    if ray_too:
        ray.shutdown()


def add_arguments(parser) -> None:
    """The `serve` command's arguments (`pipeline.cli` builds the parser)."""
    parser.add_argument("export_dir", help="directory written by the export stage")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None, help="a running Ray cluster (auto, or ray://HOST:PORT); default: "
                        "start a local Ray")
    parser.add_argument("--local", action="store_true", help="serve from this process with uvicorn, without Ray "
                        "(one machine: no proxy hop, no cluster)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="most rows decoding at once")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a new batch waits for more requests when others are queued")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs the replica reserves in Ray")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs the replica reserves (default: 1 if this "
                        "machine has one, else 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the replica (default: every core)")
    parser.add_argument("--context-device", default="auto", help="device of the context tower")
    parser.add_argument("--denoiser-device", default="auto", help="device of the denoiser tower")


def main(args) -> int:
    """The CLI command (arguments parsed by `pipeline.cli`)."""
    num_gpus = args.num_gpus
    if num_gpus is None:  # a GPU here: the replica reserves one (Ray hides GPUs from actors without any)
        import torch
        num_gpus = 1 if torch.cuda.is_available() else 0
    options = {"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
               "num_cpus": args.num_cpus, "num_gpus": num_gpus, "threads": args.threads,
               "context_device": args.context_device, "denoiser_device": args.denoiser_device}
    if args.local and args.address:
        print("error: --local serves without Ray: drop --address (or --local)", file=sys.stderr)
        return 2
    try:
        if args.local:
            local = LocalServer(args.export_dir, args.host, args.port, **options)
            url = local.url
        else:
            url = start(args.export_dir, host=args.host, port=args.port, address=args.address, **options)
    except OSError as err:  # a missing export (FileNotFoundError), a port in use
        print(f"error: {err}", file=sys.stderr)
        return 2
    stopping = _until_signalled()
    print(f"serving {args.export_dir} at {url}/v1 (OpenAI API; mode per request, default auto); Ctrl-C stops",
          flush=True)
    try:
        while not stopping.wait(1.0):
            pass
        print("stopping", flush=True)
    finally:
        local.stop() if args.local else stop()
    return 0


def _until_signalled():
    """An event set by Ctrl-C (SIGINT) or SIGTERM: the command waits on it, so a signal never lands
    as a KeyboardInterrupt in the middle of starting or stopping the server. The handlers are set
    explicitly: a command started in the background by a non-interactive shell (`cmd &` in a
    script, CI) inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt, so
    Ctrl-C-as-SIGINT would not stop the server at all."""
    import signal
    import threading

    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    return stopping
