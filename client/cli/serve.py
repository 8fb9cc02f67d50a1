"""``offramp serve``: the embedded tritonserver on a repository, supervised, until Ctrl-C or SIGTERM.

Beside the server it runs the supervisor (``offramp.client.serving.supervisor``: a stub that dies is
restarted) and a health endpoint (``offramp.client.serving.health``: ``/health/live``,
``/health/ready`` from canary requests, the supervisor's counters on ``/metrics``), both needing
explicit model control, the default. A server that exits on its own is restarted on the same ports and
repository (``ServerRestarts``: with backoff, at most 3 times in 10 minutes, then serve exits 1); its log
is kept beside the new one as ``<log>.exit-<n>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from offramp.client.cli.subcommand import Subcommand

DEFAULT_HEALTH_PORT = 8003  # after Triton's 8000 (HTTP), 8001 (gRPC), 8002 (metrics)


class ServeCommand(Subcommand):
    name = "serve"
    help = "start the embedded tritonserver on a repository, supervised, with health probes"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from offramp.client.serving.server import MODEL_CONTROL_MODES, ServerPorts

        default = ServerPorts()
        add = parser.add_argument
        add("--repository", type=Path, required=True, help="model repository directory")
        add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
        add("--http-port", type=int, default=default.http, help="default: %(default)s")
        add("--grpc-port", type=int, default=default.grpc, help="default: %(default)s")
        add("--metrics-port", type=int, default=default.metrics, help="default: %(default)s")
        add(
            "--health-port",
            type=int,
            default=DEFAULT_HEALTH_PORT,
            help="/health/live, /health/ready and the supervisor's /metrics (default: %(default)s)",
        )
        add("--log", type=Path, default=None, help="server log file (default: a temp file)")
        add("--model-control", choices=MODEL_CONTROL_MODES, default="explicit",
            help="'explicit' loads every model, lets `offramp policy` swap policies live and the supervisor "
            "restart crashed models (default: %(default)s)")  # fmt: skip
        add("--no-supervisor", action="store_true", help="do not restart models whose stub died")
        add("--no-server-restart", action="store_true",
            help="exit (status 1) when tritonserver exits on its own instead of restarting it")  # fmt: skip
        add("--admin-key", default=os.environ.get("OFFRAMP_ADMIN_KEY"),
            help="key (header offramp-admin-key) for model control; required off loopback, generated if not "
            "given (default: $OFFRAMP_ADMIN_KEY)")  # fmt: skip

    def run(self, args: argparse.Namespace) -> int:
        return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Run a server until Ctrl-C or SIGTERM, then stop it cleanly. Returns the exit status."""
    from offramp.client.serving.health import HealthEndpoint
    from offramp.client.serving.server import (
        ADMIN_KEY_HEADER,
        EmbeddedTritonServer,
        ServerPorts,
        ServerStartError,
    )
    from offramp.client.serving.supervisor import ServerRestarts, supervised

    server = EmbeddedTritonServer(
        args.repository,
        host=args.host,
        ports=ServerPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port),
        log_path=args.log,
        model_control=args.model_control,
        load_models=("*",) if args.model_control == "explicit" else (),
        admin_key=args.admin_key,
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM (from a supervisor) takes the same path as Ctrl-C: a clean stop, not an abrupt exit.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = False
    extras = contextlib.ExitStack()  # the supervisor and the health endpoint: stopped before the server
    supervision = contextlib.ExitStack()  # the stubs' supervisor of the server running now
    supervises = args.model_control == "explicit" and not args.no_supervisor
    restarts = ServerRestarts()
    try:
        server.start()
        started = True
        supervisor = supervision.enter_context(supervised(server)) if supervises else None
        extras.callback(supervision.close)
        headers = {ADMIN_KEY_HEADER: server.admin_key} if server.admin_key else None
        health = extras.enter_context(
            HealthEndpoint(args.host, args.health_port, server.grpc_url, supervisor, headers, restarts)
        )
        print(f"gRPC     {server.grpc_url}", flush=True)
        print(f"HTTP     {server.http_url}", flush=True)
        print(f"metrics  {server.metrics_url}", flush=True)
        print(
            f"health   http://{args.host}:{health.port}/health/ready (also /health/live, /health, /metrics)",
            flush=True,
        )
        print(f"log      {server.log_path}", flush=True)
        if server.removed_orphans:
            removed = [str(p) for p in server.removed_orphans]
            print(f"removed shared memory of killed servers: {removed}", flush=True)
        if supervisor is None:
            print(
                "crashed models are not restarted (no supervisor without explicit model control)", flush=True
            )
        if server.admin_key:
            print(f"model control needs header {ADMIN_KEY_HEADER}: {server.admin_key}", flush=True)
        print(f"tritonserver pid {server.pid}", flush=True)
        print("Ctrl-C to stop", flush=True)
        while True:
            while (code := server.poll()) is None:
                time.sleep(0.5)
            wait_s = None if args.no_server_restart else restarts.exited(code)
            if wait_s is None:
                budget = restarts.policy
                print(f"offramp serve: error: tritonserver exited with code {code}; see {server.log_path}"
                      + ("" if args.no_server_restart else f" (restarted {budget.max_restarts} times within "
                         f"{budget.window_s:.0f} s already: giving up)"),
                      file=sys.stderr)  # fmt: skip
                return 1
            supervision.close()  # it watched the stubs of a process group that is gone
            health.supervisor = None
            server.stop()  # its stubs and the shared memory the dead server left
            kept = _keep_log(server.log_path, len(restarts.exit_codes))
            print(f"tritonserver exited with code {code} (log kept: {kept}); restarting it", flush=True)
            time.sleep(wait_s)
            server.start()
            restarts.restarted()
            if supervises:
                health.supervisor = supervision.enter_context(supervised(server))
            print(f"tritonserver pid {server.pid}: serving again (restart {restarts.restarts})", flush=True)
    except (ServerStartError, OSError) as error:  # OSError: the health port is taken
        print(f"offramp serve: error: {str(error).splitlines()[0]}", file=sys.stderr)
        if server.log_path is not None and server.log_path.exists():
            print(f"offramp serve: see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A second Ctrl-C must not cut the clean stop short.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        extras.close()
        left = server.stop()
        print(
            "stopped"
            + (f"; removed shared memory Triton left behind: {[str(p) for p in left]}" if left else ""),
            flush=True,
        )
        return 0 if started else 130
    finally:
        extras.close()
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _keep_log(log: Path | None, exit_number: int) -> Path | None:
    """Moves a dead server's log aside (``<log>.exit-<n>``), so the restarted server's does not overwrite
    the lines that say why it died."""
    if log is None or not log.exists():
        return None
    kept = log.with_name(f"{log.name}.exit-{exit_number}")
    log.replace(kept)
    return kept
