"""`python -m agent.page_guard`: start CRIU first, then load the watch (see __init__)."""

from __future__ import annotations

import sys

from agent.page_guard import spawn, starting

USAGE = (
    "usage: python -m agent.page_guard --work DIR --token T [--container ID] [--stall S] -- CMD..."
)


def parse(argv: list[str]) -> dict[str, str] | None:
    """The options and, under "command", the index where the command starts; None: bad."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        key = argv[i].removeprefix("--")
        if key not in ("work", "token", "container", "stall") or i + 1 >= len(argv):
            return None
        opts[key] = argv[i + 1]
        i += 2
    if i + 1 >= len(argv) or "work" not in opts or "token" not in opts:
        return None
    try:
        float(opts.get("stall", "0"))
    except ValueError:
        return None
    opts["command"] = str(i + 1)
    return opts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    opts = parse(args)
    if opts is None:
        print(USAGE, file=sys.stderr)
        return 2
    command = args[int(opts["command"]) :]
    if not opts["token"].isalnum():
        print(USAGE, file=sys.stderr)
        return 2
    starting(opts["work"], opts["token"])
    pid = spawn(command)
    # Only now the rest: CRIU starts up meanwhile.
    import signal
    from pathlib import Path

    from agent.page_guard.watch import Guard

    guard = Guard(
        command,
        Path(opts["work"]),
        opts["token"],
        opts.get("container"),
        float(opts.get("stall", "0")),
        child=pid,
    )
    signal.signal(signal.SIGTERM, guard.terminate)
    signal.signal(signal.SIGINT, guard.terminate)
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())
