"""The `ferry` command line.

Each command family lives in its own module and registers itself on `main`;
this module only builds the group and imports them.

Exit codes (shared by every command):
  0  success
  1  the operation ran and failed (e.g. a migration rolled back)
  2  bad input: config, policy or arguments invalid (message names file and key)
  3  prerequisites missing or the agent/peer is unreachable
"""

from __future__ import annotations

import click

from agent import __version__

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ferry")
def main() -> None:
    """Ferry live-migrates Docker containers between hosts with CRIU.

    Run `ferry COMMAND --help` for details on each command.
    """


# Command modules register on `main` at import time.
from agent.cli import certs_cmds as _certs_cmds  # noqa: E402,F401
from agent.cli import check_cmds as _check_cmds  # noqa: E402,F401
from agent.cli import config_cmds as _config_cmds  # noqa: E402,F401
from agent.cli import fleet_cmds as _fleet_cmds  # noqa: E402,F401
from agent.cli import migrate_cmds as _migrate_cmds  # noqa: E402,F401
from agent.cli import ops_cmds as _ops_cmds  # noqa: E402,F401
