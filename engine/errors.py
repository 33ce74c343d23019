"""Errors the engine raises at start-up, each a single line a user can act on."""


class CheckpointError(ValueError):
    """The checkpoint directory cannot be served as it is (names the file and tensor)."""


class EngineDeadError(RuntimeError):
    """A stage process died or stopped answering; requests in flight are lost."""


def one_line(e: BaseException) -> str:
    """An exception as one line for people: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
