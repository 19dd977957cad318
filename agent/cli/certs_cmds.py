"""Placeholder: commands are added by their owning work item."""

from agent.cli import main  # noqa: F401
