"""Reading YAML that people wrote: strict, bounded, and every failure one line.

Config files, policy files and timelines all come through `read_yaml`, so the
same nonsense is refused the same way everywhere:

- a key written twice in one mapping (YAML would silently keep the last one);
- nesting deeper than `MAX_DEPTH` (PyYAML's composer recurses, and a few
  thousand `[` would otherwise end in a RecursionError);
- more than `max_nodes` values once aliases are expanded (a "billion laughs"
  file is a few lines that expand to more than validation can walk);
- files that are not regular files (a FIFO or /dev/zero would block or never
  end), larger than `max_bytes`, or not UTF-8 text.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from agent.errors import InputError

MAX_DEPTH = 32
MAX_BYTES = 1024 * 1024
MAX_NODES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _TooDeep(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and bounds nesting while composing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(
                    problem=f"nested deeper than {MAX_DEPTH} levels",
                    problem_mark=self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # Merge keys (`<<: *defaults`) may be overridden on purpose; scalars written twice not.
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, max_nodes: int = MAX_NODES) -> Any:
    """Parse YAML text strictly; raises yaml.YAMLError or ValueError (too big once expanded)."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    _check_size(data, max_nodes)
    return data


def _check_size(data: Any, max_nodes: int) -> None:
    # Walks the value as validation will, aliases expanded, and stops at the budget.
    count = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise ValueError(f"more than {max_nodes} values once aliases are expanded")
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels (through aliases)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for pair in value.items() for v in pair)
        elif isinstance(value, list | tuple | set):
            stack.extend((v, depth + 1) for v in value)


def read_yaml(
    path: Path,
    shown: str | None = None,
    *,
    max_bytes: int = MAX_BYTES,
    max_nodes: int = MAX_NODES,
) -> Any:
    """Parse a YAML file; any problem becomes an InputError naming the file (and line)."""
    name = shown if shown is not None else str(path)
    text = _read_text(path, name, max_bytes)
    try:
        return parse_yaml(text, max_nodes)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = exc.problem or exc.context or "invalid YAML"
        prefix = "" if isinstance(exc, _TooDeep | ConstructorError) else "YAML syntax error: "
        raise InputError.single(name, "", f"{prefix}{what}", line) from None
    except yaml.reader.ReaderError as exc:
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise InputError.single(
            name, "", f"character {char!r} at offset {exc.position} is not allowed in YAML"
        ) from None
    except yaml.YAMLError as exc:
        raise InputError.single(name, "", f"YAML syntax error: {exc}") from None
    except (ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise InputError.single(name, "", reason) from None


def _read_text(path: Path, name: str, max_bytes: int) -> str:
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise InputError.single(name, "", "is a directory, expected a YAML file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError.single(name, "", "not a regular file")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError.single(name, "", "file not found") from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InputError.single(name, "", f"cannot read: {reason}") from None
    if len(data) > max_bytes:
        raise InputError.single(name, "", f"larger than {max_bytes} bytes; not a file to check")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError.single(
            name, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
