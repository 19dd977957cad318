"""`python -m agent.page_guard`: start CRIU first, then load the watch (see __init__)."""

from __future__ import annotations

import sys

from agent.page_guard import spawn, starting, write_status

USAGE = (
    "usage: python -m agent.page_guard --work DIR --token T [--container ID] [--stall S] -- CMD..."
)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str]] | None:
    """(the options, the command after "--"); None when they cannot be run."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        key = argv[i].removeprefix("--")
        if key not in ("work", "token", "container", "stall") or i + 1 >= len(argv):
            return None
        opts[key] = argv[i + 1]
        i += 2
    command = argv[i + 1 :]
    if not command or "work" not in opts or not opts.get("token", "").isalnum():
        return None  # the token goes into JSON unescaped, and into file names
    try:
        float(opts.get("stall", "0"))
    except ValueError:
        return None
    return opts, command


def main(argv: list[str] | None = None) -> int:
    parsed = parse(sys.argv[1:] if argv is None else argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    opts, command = parsed
    starting(opts["work"], opts["token"])
    try:
        pid = spawn(command)
    except OSError as exc:
        import json

        why = f"cannot run {command[0]}: {exc}"
        write_status(
            opts["work"], json.dumps({"token": opts["token"], "state": "failed", "reason": why})
        )
        print(why, file=sys.stderr)
        return 127
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
