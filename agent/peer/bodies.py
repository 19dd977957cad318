"""The shapes of the peer API's JSON bodies, checked at the route before any handler runs.

A wrongly shaped body (`{"spec": 5}`, `{"memory_bytes": "lots"}`) is answered
with 400 and one line naming the field. Types are strict: a string is not a
number. Extra keys are tolerated and passed on untouched, so agents one version
apart still talk; a handler ignores what it does not read.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$"
_IMAGE_ID = r"^sha256:[0-9a-f]{64}$"


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Port(_Body):
    host_ip: str = ""
    host_port: int = Field(ge=0, le=65535)


class PrepareBody(_Body):
    migration_id: str = Field(pattern=_ID)
    name: str = Field(pattern=_NAME)
    container_id: str = Field(default="", max_length=128)
    image_id: str = Field(default="", pattern=rf"{_IMAGE_ID}|^$")
    image_ref: str = Field(default="", max_length=512)
    image_bytes: int = Field(default=0, ge=0)
    memory_bytes: int = Field(default=0, ge=0)
    state_bytes_estimate: int = Field(default=0, ge=0)
    ports: list[_Port] = Field(default=[], max_length=4096)
    networks: list[str] = Field(default=[], max_length=256)
    volumes: list[str] = Field(default=[], max_length=256)
    protocol: int = Field(default=1, ge=1)  # agent.peer.protocol


class CheckBody(_Body):
    """A dry run of prepare: the same fields without a migration id, and maybe the spec."""

    name: str = Field(pattern=_NAME)
    container_id: str = Field(default="", max_length=128)
    image_id: str = Field(default="", pattern=rf"{_IMAGE_ID}|^$")
    image_bytes: int = Field(default=0, ge=0)
    memory_bytes: int = Field(default=0, ge=0)
    state_bytes_estimate: int = Field(default=0, ge=0)
    ports: list[_Port] = Field(default=[], max_length=4096)
    networks: list[str] = Field(default=[], max_length=256)
    volumes: list[str] = Field(default=[], max_length=256)
    spec: dict[str, Any] | None = None  # its inside is checked by agent.migration.accept
    protocol: int = Field(default=1, ge=1)  # agent.peer.protocol


class StageBody(_Body):
    spec: dict[str, Any]  # its inside is checked by agent.migration.accept


class RestoreBody(_Body):
    digest: str | None = Field(default=None, max_length=100)
    checkpoint: str | None = Field(default=None, max_length=200)


class AbortBody(_Body):
    reason: str | None = Field(default=None, max_length=2000)


class ImageMeta(_Body):
    image_id: str = Field(pattern=_IMAGE_ID)
    image: str = Field(default="", max_length=512)
    names: list[str] = Field(default=[], max_length=64)


class BodyShapeError(ValueError):
    """One line: the first bad field and what is wrong with it."""


def checked(model: type[_Body], body: dict[str, Any], what: str) -> dict[str, Any]:
    """`body` with its known fields validated; unknown ones passed through as they were."""
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise BodyShapeError(one_line(exc, what)) from None
    return {**body, **parsed.model_dump(exclude_unset=True)}


def one_line(exc: ValidationError, root: str) -> str:
    """The first problem of a pydantic error as `where: what`, without echoing the input."""
    err = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join([root, *(str(p) for p in err["loc"])])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"
