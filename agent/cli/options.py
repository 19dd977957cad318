"""What the commands that talk to the local agent share: where its config is, and loading it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from agent.cli import EXIT_BAD_INPUT
from agent.config import FerryConfig, load_config
from agent.errors import InputError

DEFAULT_CONFIG = "/etc/ferry/config.yaml"


def config_option(help: str = "Agent config file (env FERRY_CONFIG).") -> Callable[[Any], Any]:
    return click.option(
        "--config",
        "config_path",
        default=DEFAULT_CONFIG,
        show_default=True,
        envvar="FERRY_CONFIG",
        type=click.Path(dir_okay=False, path_type=Path),
        help=help,
    )


def load_config_or_exit(path: Path) -> FerryConfig:
    """The config, or exit 2 with one line per problem on stderr."""
    try:
        return load_config(path)
    except InputError as exc:
        for line in exc.lines():
            click.echo(line, err=True)
        sys.exit(EXIT_BAD_INPUT)
