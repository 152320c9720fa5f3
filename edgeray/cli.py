"""The `edgeray` command line.

    edgeray main [--config FILE] [--set key=value ...] [--no-serve]   (head + dashboard + Serve apps + FL job)
    edgeray down                                          (stop what `main` started)
    edgeray run <strategy> --config FILE [--set key=value ...] [--resume RUN_DIR] [--address ADDR]
    edgeray rl <train|eval> <method> ...          (see `edgeray rl --help`)
    edgeray serve <app> ...                        (see `edgeray serve --help`)

Any `UserError` is printed as one line `edgeray: error: ...` with exit code 2; no traceback.
"""

from __future__ import annotations

import sys

from edgeray.errors import UserError

USAGE = """usage: edgeray <command> ...

commands:
  main             the service: a local Ray head with the dashboard, the Serve apps (SVD at /v1, SIDeR at
                   /sider; --no-serve skips them), the FL job through Ray Jobs, followed (edgeray main --help)
  down             stop what `edgeray main` started (head, Prometheus, Serve apps, jobs)
  run <strategy>   run a federated / split learning method in this process (edgeray run --help)
  rl ...           train and evaluate RLlib methods (edgeray rl --help)
  serve ...        start the Ray Serve HTTP apps (edgeray serve --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE, end="")
            return 0 if argv else 2
        command, rest = argv[0], argv[1:]
        if command in ("main", "down"):
            from edgeray.launch import main as launch_main, stop_head
            return launch_main(rest) if command == "main" else stop_head()
        if command == "run":
            from actors.cli import main as run_main
            return run_main(rest)
        if command == "rl":
            from rl.cli import main as rl_main
            return rl_main(rest)
        if command == "serve":
            from serving.cli import main as serve_main
            return serve_main(rest)
        raise UserError(f"unknown command {command!r}; choose one of: main, down, run, rl, serve")
    except UserError as exc:
        print(f"edgeray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgeray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
