"""`edgeray serve`: run the HTTP services on Ray Serve until Ctrl-C.

    edgeray serve svd   [--config configs/svd.yaml]   [--set key=value ...]
    edgeray serve sider [--config configs/sider.yaml] [--set key=value ...]
    edgeray serve all                                  # both, SVD at / and SIDeR at /sider
    options: --host 127.0.0.1 --port 8000 --address ADDR --num-cpus N --default-proxy

Ray is joined through `edgeray.connect`: ``--address`` (else RAY_ADDRESS) attaches to a cluster
with token authentication; otherwise a local Ray of ``--num-cpus`` (default: all cores) starts.

On a local Ray, Serve runs with HAProxy in front and direct ingress to the replicas
(``RAY_SERVE_ENABLE_HA_PROXY=1``, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``): the default Python proxy
adds a Ray actor hop of ~6-10 ms per request on 2 cores, this mode ~1 ms
(bench/serve_overhead.py). ``--default-proxy`` keeps Serve's default. Attached to a cluster
(``--address``), the mode is whatever the cluster was started with (the variables are read when
Ray starts).
"""

from __future__ import annotations

import importlib
import os
import signal
import threading

from edgeray.argparse_util import ArgumentParser
from edgeray.connect import connect
from edgeray.errors import UserError

FAST_SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# name -> (module with app_builder, route prefix, how that builder takes a config path and overrides)
APPS = {
    "svd": ("serving.svd.app", "/", lambda config, sets: {**({"config": config} if config else {}),
                                                          **dict(s.split("=", 1) for s in sets)}),
    "sider": ("serving.sider.app", "/sider", lambda config, sets: {**({"config": config} if config else {}),
                                                                   "set": list(sets)}),
}


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="edgeray serve", description="Serve the HTTP apps on Ray Serve.")
    parser.add_argument("app", choices=[*APPS, "all"])
    parser.add_argument("--config", help="the app's YAML config (not with 'all')")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", help="Ray cluster to deploy to (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores; "
                        "ignored when attaching to a cluster)")
    parser.add_argument("--default-proxy", action="store_true", help="Serve's default Python proxy")
    args = parser.parse_args(argv)
    names = list(APPS) if args.app == "all" else [args.app]
    if args.app == "all" and (args.config or args.overrides):
        raise UserError("--config and --set apply to one app; serve them one by one to configure them")
    bad = [s for s in args.overrides if "=" not in s]
    if bad:
        raise UserError(f"--set expects key=value, got {bad[0]!r}")
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {args.num_cpus}")
    connection, apps = _connect_and_build(args, names)

    import ray
    from ray import serve

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which installs its own
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        for name, app in apps.items():
            prefix = APPS[name][1]
            serve.run(app, name=name, route_prefix=prefix)
            print(f"{name}: http://{args.host}:{args.port}{prefix.rstrip('/')}/  "
                  f"(OpenAPI: {prefix.rstrip('/')}/docs)", flush=True)
        print("serving; Ctrl-C to stop", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    finally:
        if connection != "local":  # on a shared cluster, remove what we deployed; a local Ray ends with us
            for name in names:
                serve.delete(name)
        if connection is not None:  # None: this process was connected already, by someone else
            ray.shutdown()
    return 0


def _build_apps(names: list[str], args) -> dict:
    return {name: importlib.import_module(APPS[name][0]).app_builder(APPS[name][2](args.config, args.overrides))
            for name in names}


def _connect_and_build(args, names: list[str]) -> tuple[str | None, dict]:
    """(connect()'s answer, the built apps)."""
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Attach first: the app modules import Ray, and Ray reads the RAY_AUTH_MODE=token that
        # connect() sets only when it is imported. A bad config then fails after attaching.
        connection = connect(address)
        try:
            return connection, _build_apps(names, args)
        except BaseException:
            if connection is not None:
                import ray
                ray.shutdown()
            raise
    apps = _build_apps(names, args)  # a bad config fails here, before the local Ray starts
    if not args.default_proxy:
        os.environ.update(FAST_SERVE_ENV)  # read when the local Ray starts
    return connect(None, num_cpus=args.num_cpus), apps
