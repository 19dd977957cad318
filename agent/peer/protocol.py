"""Which agents may migrate with each other: the peer protocol number.

A fleet is upgraded one host at a time, so agents of two releases meet. Each
agent says which migration protocol it speaks (in its health answer, in the
bodies it sends to prepare or check a move, and in its answer to them) and
refuses a peer older than the oldest it still speaks, with a reason that names
both numbers and says which side to upgrade. The newer side of a compatible
pair speaks the older one's protocol. Agents from before the number was sent
speak protocol 1.

Raise PROTOCOL when an agent needs something of its peer that an older one
does not do; raise OLDEST when this agent no longer speaks an older protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROTOCOL = 1  # what this agent speaks
OLDEST = 1  # the oldest peer protocol this agent still migrates with
KEY = "protocol"
OLDEST_KEY = "protocol_oldest"  # in health answers: placement skips a peer too new for us


def of(doc: Mapping[str, Any], key: str = KEY) -> int:
    """The protocol a peer's body or answer declares; 1 if it says none.

    Raises ValueError for a value that is not a positive whole number.
    """
    value = doc.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key} must be a whole number >= 1, not {value!r}")
    return value


@dataclass(frozen=True)
class Mismatch:
    """Why a peer cannot pair with this agent, and which side is behind."""

    what: str  # "speaks peer protocol 1, older than 2"
    peer_is_older: bool  # else this host is the one to upgrade

    def __str__(self) -> str:
        return f"{self.what}: upgrade {'it' if self.peer_is_older else 'this host'}"


def mismatch(speaks: int, oldest: int) -> Mismatch | None:
    """Why a peer that speaks `speaks` and still migrates with `oldest` cannot pair with
    this agent, from either side; None if it can."""
    if speaks < OLDEST:
        return Mismatch(f"speaks peer protocol {speaks}, older than {OLDEST}", True)
    if oldest > PROTOCOL:
        return Mismatch(
            f"needs peer protocol {oldest} or newer, this agent speaks {PROTOCOL}", False
        )
    return None


def too_old(peer: str, here: str, protocol: int) -> str | None:
    """Why `here` will not migrate with `peer`, which speaks `protocol`; None if it will."""
    if protocol >= OLDEST:
        return None
    return (
        f"{peer} speaks Ferry peer protocol {protocol}, and {here} needs at least {OLDEST} "
        f"(it speaks {PROTOCOL}): upgrade the agent on {peer} before moving containers "
        "between them"
    )


def refusal(peer: str, here: str, doc: Mapping[str, Any]) -> str | None:
    """`too_old` for a body or answer, or why its protocol field is unreadable."""
    try:
        return too_old(peer, here, of(doc))
    except ValueError as exc:
        return f"{peer}'s {exc}"
