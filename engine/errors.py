"""Errors the engine raises at start-up, each a single line a user can act on."""


class CheckpointError(ValueError):
    """The checkpoint directory cannot be served as it is (names the file and tensor)."""


class EngineDeadError(RuntimeError):
    """A stage process died or stopped answering; requests in flight are lost."""
