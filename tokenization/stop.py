"""Stop-string detection over a stream of text deltas.

The result never depends on how the text was split into deltas: a stop string is detected at the
first position where the text seen so far ends with one (the longest, if several end there), which
is what checking after every single character would find.

Each stop string is matched with its Knuth-Morris-Pratt failure table, so memory is linear in the
stop strings' length and each character costs amortised constant time per stop string. The state
per stop string is the length of the longest tail of the text that is a prefix of it: the most
of the text that must be withheld because it might still become a match.
"""
from __future__ import annotations


def _failure_table(s: str) -> list[int]:
    """fail[i]: length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    __slots__ = ("_stops", "_fails", "_states", "_include", "_held", "_stopped")

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))  # "" would match everywhere
        self._fails = tuple(_failure_table(s) for s in self._stops)
        self._states = [0] * len(self._stops)
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
        base = len(self._held)
        states = self._states
        for i, ch in enumerate(delta):
            longest = 0  # the longest stop string ending at this character
            for k, (stop, fail) in enumerate(zip(self._stops, self._fails)):
                q = states[k]
                while q and stop[q] != ch:
                    q = fail[q - 1]
                if stop[q] == ch:
                    q += 1
                if q == len(stop):
                    longest = max(longest, q)
                    q = fail[q - 1]
                states[k] = q
            if longest:
                end = base + i + 1
                self._stopped = True
                self._held = ""
                return buf[:end if self._include else end - longest], True
        hold = max(states)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """The withheld tail, for when generation ends without hitting a stop string."""
        held, self._held = self._held, ""
        self._states = [0] * len(self._stops)
        return held
