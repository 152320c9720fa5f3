"""Shared fixtures: one local Ray per test session, one Serve instance on a test port.

Never call a bare `ray.init(num_cpus=...)`: it would join a head already running on the
machine. `address="local"` always starts our own instance.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SERVE_TEST_PORT = int(os.environ.get("EDGERAY_SERVE_TEST_PORT", "18123"))   # another port for a parallel session
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Ray workers inherit the environment of the first ray.init: let them import test helper modules.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    # Serve (if a test started it) is shut down first so no replica outlives the session.
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_session):
    """Base URL of a Serve HTTP proxy on 127.0.0.1:SERVE_TEST_PORT. Deploy apps with
    `serve.run(app, name=..., route_prefix=...)`; each test module uses its own name/prefix."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_TEST_PORT})
    return f"http://127.0.0.1:{SERVE_TEST_PORT}"
