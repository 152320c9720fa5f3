"""The one Ray connection of every entry point (`edgeray run`, `edgeray rl`, `edgeray serve`).

    mode = connect(address, num_cpus=2)     # "attached" | "local" | None (already connected)

- ``address`` (or ``RAY_ADDRESS``) attaches to a running cluster. Ray 2.60 heads require token
  authentication and a driver without the token retries forever, so attaching sets
  ``RAY_AUTH_MODE=token``, which Ray reads when it is imported: call ``connect`` before anything
  imports ray. A ``HOST:PORT`` that does not answer fails in seconds with a one-line error, not
  after Ray's minute of retries.
- Without an address it starts a Ray of its own (``address="local"``): a bare ``ray.init()``
  would join any head already running on the machine, someone else's included.
- Inside ``ray job submit`` Ray sets ``RAY_ADDRESS``, so a submitted job joins its cluster.
"""

from __future__ import annotations

import logging
import os
import socket

from edgeray.errors import UserError


def connect(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
            log_to_driver: bool = True) -> str | None:
    """Attach to ``address`` / RAY_ADDRESS ("attached"), or start a local Ray ("local");
    None when this process is already connected (the caller then must not shut Ray down)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        _check_reachable(address)
    import ray

    if ray.is_initialized():
        return None
    if not address:
        ray.init(address="local", include_dashboard=dashboard, logging_level=logging.WARNING,
                 log_to_driver=log_to_driver, **({"num_cpus": num_cpus} if num_cpus else {}))
        return "local"
    if num_cpus:
        logging.getLogger("edgeray").info("num_cpus=%s ignored: the cluster at %s has its own", num_cpus, address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    return "attached"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when HOST:PORT does not answer."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # "auto", ray://...: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"cannot attach to the Ray cluster at {address}: {exc.strerror or exc}; "
                        f"is a head running there (`ray start --head`, `edgeray main`)?") from None
