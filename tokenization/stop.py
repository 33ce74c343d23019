"""Stop-string detection over a stream of text deltas.

The result never depends on how the text was split into deltas: a stop string is detected at the
first position where the text seen so far ends with one (the longest, if several end there), which
is what checking after every single character would find.
"""
from __future__ import annotations


class StopMatcher:
    __slots__ = ("_stops", "_prefixes", "_max_hold", "_include", "_held", "_stopped")

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))  # "" would match everywhere
        # Proper prefixes of stop strings: a tail equal to one of them might still become a match.
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._include = include_stop_str_in_output
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string has been hit)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        buf = self._held + delta
        best: tuple[int, int] | None = None  # (end, -length) of the earliest-ending match
        for stop in self._stops:
            start = buf.find(stop)
            if start >= 0:
                key = (start + len(stop), -len(stop))
                if best is None or key < best:
                    best = key
        if best is not None:
            end, neg_len = best
            self._stopped = True
            self._held = ""
            return buf[:end if self._include else end + neg_len], True
        hold = self._partial_match_length(buf)
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold], False
        self._held = ""
        return buf, False

    def flush(self) -> str:
        """The withheld tail, for when generation ends without hitting a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_match_length(self, buf: str) -> int:
        prefixes = self._prefixes
        for k in range(min(len(buf), self._max_hold), 0, -1):
            if buf[-k:] in prefixes:
                return k
        return 0
