"""``make lab``: JupyterLab on ``notebooks/``, saying first which URL to open and what the notebooks read.

Usage::

    python -m cxrlib.lab                       # what `make lab` runs
    python -m cxrlib.lab --port 8890 --no-browser
    python -m cxrlib.lab --ip 0.0.0.0          # reachable from other machines (e.g. over an SSH tunnel)

It prints the preset the notebooks' parameters cells default to and whether that preset's run
is complete, and when it is not, the command that produces it; then the URL (with a fresh
token) and starts ``jupyter lab`` from this environment in its place. Arguments it does not
know go to ``jupyter lab``.
"""

from __future__ import annotations

import argparse
import ast
import os
import secrets
import socket
import sys
from collections.abc import Sequence

from . import paths


def default_preset(notebook: str | os.PathLike | None = None) -> str:
    """The ``preset`` default of a notebook's parameters cell (``00_data`` unless given)."""
    import papermill

    notebook = notebook or paths.NOTEBOOKS_DIR / "00_data.ipynb"
    return ast.literal_eval(papermill.inspect_notebook(str(notebook))["preset"]["default"])


def first_step_to_run(preset_arg: str, run_dir: str | None = None) -> str | None:
    """The first step of the preset's pipeline that is not complete (as ``--list`` reports it),
    or None when every step is."""
    from . import pipeline

    preset_arg, preset, overrides = pipeline.resolve_run(preset_arg, run_dir=run_dir)
    for step, resolution in pipeline.planned_steps(preset):
        fingerprint = pipeline.step_settings(preset_arg, preset, overrides, step, resolution)[2]
        if pipeline.step_state(preset, step, resolution, fingerprint) != "complete":
            return step.name(resolution)
    return None


def status_lines(preset_arg: str, run_dir: str | None = None) -> list[str]:
    """What the notebooks read by default, and the command that produces it when it is not complete."""
    from .prerequisites import shown_path
    from .presets import resolve

    where = shown_path(resolve(preset_arg, run_dir=run_dir).run_path)
    lines = [f'The notebooks\' parameters default to preset "{preset_arg}": they read {where}/']
    step = first_step_to_run(preset_arg, run_dir)
    if step is None:
        lines.append(f"{where} is complete: every notebook runs as it is.")
    else:
        command = f"python -m cxrlib.pipeline --preset {preset_arg}"
        if preset_arg == "demo":
            command += " (or make demo)"
        lines.append(f"{where} has no finished run (from {step} on): {command} produces one.")
    return lines


def free_port(preferred: int = 8888, host: str = "127.0.0.1") -> int:
    """``preferred`` when nothing listens on it, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError(f"no free port on {host}")


def lab_command(
    port: int,
    token: str,
    ip: str = "127.0.0.1",
    extra: Sequence[str] = (),
    root_dir: str | os.PathLike | None = None,
) -> list[str]:
    """``jupyter lab`` from this environment on ``root_dir`` (default ``notebooks/``), port and token.

    As root (a container, CI) it adds ``--allow-root``, which JupyterLab otherwise asks for.
    """
    as_root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        f"--ServerApp.root_dir={root_dir or paths.NOTEBOOKS_DIR}",
        f"--ServerApp.ip={ip}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        *as_root,
        *extra,
    ]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--port", type=int, default=8888, help="port (default 8888, or a free one)")
    parser.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = get_args_parser().parse_known_args(argv)
    preset = default_preset()
    for line in status_lines(preset):
        print(line)
    port, token = free_port(args.port, args.ip), secrets.token_hex(16)
    host = "127.0.0.1" if args.ip in ("0.0.0.0", "") else args.ip
    print(f"Open http://{host}:{port}/lab?token={token}  (Ctrl+C twice stops JupyterLab)", flush=True)
    command = lab_command(port, token, args.ip, extra)
    os.execv(command[0], command)
    return 0  # not reached: jupyter lab replaced this process


if __name__ == "__main__":
    sys.exit(main())
