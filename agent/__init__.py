"""Ferry: live-migrate stateful Docker containers between hosts."""

__version__ = "0.1.0"
