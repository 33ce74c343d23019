"""What one client may cost the server: body size, how long it may take to send a request, connections."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ServerLimits:
    max_body_bytes: int = 8 * 2**20  # a request body past this gets 413 (at once, when Content-Length says so)
    header_timeout_s: float = 10.0  # from a connection's opening, or the next request's first byte, to a whole head
    body_timeout_s: float = 60.0  # to read a request's whole body once its head is in
    write_timeout_s: float = 60.0  # a client that takes none of its answer for this long is dropped
    max_connections: int = 2048  # open connections; one more is answered 503 and closed

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        for name in ("header_timeout_s", "body_timeout_s", "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
