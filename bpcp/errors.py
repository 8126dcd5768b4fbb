"""The one exception bpcp raises for problems a user can fix."""
from __future__ import annotations


class BpcpError(Exception):
    """A user-fixable problem. Each line of the message says what is wrong and how to fix it."""

    def __init__(self, message: str | list[str]):
        self.lines = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.lines))
