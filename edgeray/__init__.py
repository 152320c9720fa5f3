"""edgeray: Ray-based orchestration for edge-AI research systems.

This package holds what every system shares: typed configuration (`edgeray.config`),
the user-facing error type (`edgeray.errors`), run directories (`edgeray.runs`) and the
`edgeray` command line (`edgeray.cli`). Algorithms live in `pipelines/` and `rl/`, the
Ray runtime in `actors/`, HTTP services in `serving/`.
"""

__version__ = "0.1.0"
