"""User-facing errors. Anything raised from here is printed as one message, never a traceback."""

from __future__ import annotations


class PescError(Exception):
    """Base class: a problem with the user's input or configuration, with a readable message."""


class DataError(PescError):
    """A data file is malformed. The message names the file, the dialogue id and the turn."""

    def __init__(self, message: str, *, path: str | None = None, dialogue_id: str | None = None,
                 turn: int | None = None, line: int | None = None):
        self.path, self.dialogue_id, self.turn, self.line = path, dialogue_id, turn, line
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if dialogue_id is not None:
            where.append(f"dialogue {dialogue_id}")
        if turn is not None:
            where.append(f"turn {turn}")
        self.reason = message
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class ConfigError(PescError):
    """An invalid option, preset or combination of options."""
