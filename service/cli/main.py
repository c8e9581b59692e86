"""`trtforge`: the command line's group and entry point. Each command group is one module of this
package (local: calibrate/table/inspect; engines: build/sensitivity; measure: bench/compare/sweep;
server: serve/worker/tokens and the HTTP client commands); :mod:`.options` holds what they share."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import click

from service.cli import engines, local, measure, remote, server

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="trtforge")
def cli(verbose: int) -> None:
    """trtforge: calibrate, build, benchmark and serve INT8/FP16 TensorRT engines."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


for _commands in (local, engines, measure, server, remote):
    _commands.register(cli)


def main(argv: Sequence[str] | None = None) -> Any:
    """Console-script entry point."""
    return cli.main(args=list(argv) if argv is not None else None, prog_name="trtforge")
