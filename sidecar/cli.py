"""`sidecar serve` runs the server; `sidecar client ...` calls one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from sidecar.config import Settings, load_settings
from sidecar.errors import SidecarError

log = logging.getLogger("sidecar")


def _add_serve(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve model dirs over gRPC",
        description="Serve model dirs over gRPC. Flags override SIDECAR_* variables, "
        "which override the config file.",
    )
    serve.add_argument("--config", type=Path, help="YAML settings file (or SIDECAR_CONFIG)")
    for item in fields(Settings):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata["help"] + f" [SIDECAR_{item.name.upper()}]"
        if item.name == "models":
            serve.add_argument(
                "--model", dest="models", action="append", metavar="[NAME=]DIR", help=help_text
            )
        elif item.type in (bool, "bool"):
            serve.add_argument(
                flag, dest=item.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            serve.add_argument(flag, dest=item.name, metavar="VALUE", help=help_text)


class _Stopped(BaseException):
    """SIGTERM or SIGINT before the event loop took the signals over (a BaseException, so
    no `except Exception` on the way swallows it)."""


def _stop_now(signum: int, frame: object) -> None:
    raise _Stopped(signal.Signals(signum).name)


def _serve(args: argparse.Namespace) -> int:
    try:
        flags = {f.name: getattr(args, f.name) for f in fields(Settings)}
        settings = load_settings(flags, config_file=args.config)
        from sidecar.telemetry import logs

        logs.configure(settings.log_level, settings.log_format)
        from sidecar.server import serve  # grpc and onnxruntime load only when serving

        abandoned = asyncio.run(serve(settings))
    except _Stopped as stopped:
        log.warning("%s while starting: stopped", stopped)
        return 0
    if abandoned:
        # A model still loading cannot be interrupted, and Python would wait for its thread
        # at exit (minutes for a large model): leave now, the logs flushed.
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sidecar` command."""
    serving = (sys.argv[1:] if argv is None else argv)[:1] == ["serve"]
    previous: dict[int, Any] = {}
    try:
        if serving and threading.current_thread() is threading.main_thread():
            # Until the server's event loop takes them over, a signal ends the start cleanly
            # (exit 0) instead of killing the process: Kubernetes may stop a pod as it starts.
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, _stop_now)
        parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
        commands = parser.add_subparsers(dest="command", required=True)
        _add_serve(commands)
        from sidecar import client

        client.add_parser(commands)
        args = parser.parse_args(argv)
        if args.command == "serve":
            return _serve(args)
        return int(args.run(args))
    except _Stopped:  # before logging is set up: nothing to report, nothing was started
        return 0
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        for number, handler in previous.items():  # a caller's own handlers, as they were
            if handler is not None:  # None: one not set from Python, left as it is
                signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
