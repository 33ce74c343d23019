"""What the harness sends: chat-like sessions, fixed-length random prompts, or a user's JSONL file.

A workload is a list of sessions; a session is a list of turns sent one after the other
(the next turn waits for the previous answer and a think time). Single-request workloads
are sessions of one turn. Conversations keep their history: each turn resends the system
prompt and every earlier user message and answer, so prompts grow as chat prompts do.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

# Common short English words: most tokenizers spend about one token on each.
WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "over new sound take only little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any same tell boy follow came"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


@dataclass(slots=True)
class Length:
    """A length distribution: fixed, uniform within a range ratio, or log-normal around a mean."""

    mean: int
    spread: float = 0.0  # uniform: +-spread*mean; lognormal: sigma
    kind: str = "uniform"

    def draw(self, rng: random.Random) -> int:
        if self.kind == "lognormal" and self.spread > 0:
            mu = math.log(max(self.mean, 1)) - self.spread**2 / 2
            return max(1, round(rng.lognormvariate(mu, self.spread)))
        lo, hi = round(self.mean * (1 - self.spread)), round(self.mean * (1 + self.spread))
        return max(1, rng.randint(lo, hi) if hi > lo else self.mean)

    @staticmethod
    def parse(text: str) -> Length:
        """'128' (fixed), '128:0.5' (uniform +-50%), 'lognormal:128:0.6'."""
        parts = text.split(":")
        try:
            if parts[0] == "lognormal":
                return Length(int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.5, "lognormal")
            return Length(int(parts[0]), float(parts[1]) if len(parts) > 1 else 0.0)
        except (ValueError, IndexError):
            raise ValueError(f"cannot read length {text!r}; use N, N:RATIO or lognormal:MEAN:SIGMA") from None


@dataclass(slots=True)
class Turn:
    user: str | list[dict]  # a user message, or whole messages (for a JSONL chat line)
    max_tokens: int


@dataclass(slots=True)
class Session:
    turns: list[Turn]
    system: str | None = None
    think_time_s: list[float] = field(default_factory=list)  # before each turn after the first
    raw: bool = False  # its prompt goes to /v1/completions as it is (a random prompt), not as a transcript


def conversations(n: int, rng: random.Random, system_len: int, turns: Length, user_len: Length, answer_len: Length,
                  think_time_s: float) -> list[Session]:
    """Chat sessions sharing one system prompt, each with a few turns and think time between them."""
    system = words(random.Random(0), system_len) if system_len > 0 else None
    sessions = []
    for _ in range(n):
        k = turns.draw(rng)
        sessions.append(Session(
            [Turn(words(rng, user_len.draw(rng)), answer_len.draw(rng)) for _ in range(k)], system,
            [rng.expovariate(1 / think_time_s) if think_time_s > 0 else 0.0 for _ in range(k - 1)],
        ))
    return sessions


def random_prompts(n: int, rng: random.Random, input_len: Length, output_len: Length, counter=None) -> list[Session]:
    """Prompts of input_len tokens where a counter (loadtest.tokens) counts them, else of that many words."""
    text = (lambda k: counter.text_of(k, rng)) if counter is not None else (lambda k: words(rng, k))
    return [Session([Turn(text(input_len.draw(rng)), output_len.draw(rng))], raw=True) for _ in range(n)]


def from_jsonl(path: str | Path, default_max_tokens: int) -> list[Session]:
    """Lines of {"prompt": str}, {"messages": [...]}, or {"turns": [str, ...], "system": str}; each may give
    "max_tokens"."""
    sessions = []
    for i, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            max_tokens = int(row.get("max_tokens", default_max_tokens))
            if "turns" in row:
                sessions.append(Session([Turn(t, max_tokens) for t in row["turns"]], row.get("system"),
                                        [float(row.get("think_time_s", 0))] * (len(row["turns"]) - 1)))
            elif "messages" in row:
                sessions.append(Session([Turn(list(row["messages"]), max_tokens)]))
            else:
                sessions.append(Session([Turn(str(row["prompt"]), max_tokens)]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{i}: cannot read this line ({e}); see `strata bench --help` for the format") from None
    if not sessions:
        raise ValueError(f"{path}: no prompts")
    return sessions


def chat_messages(session: Session, history: list[dict], turn: Turn) -> list[dict]:
    if isinstance(turn.user, list):
        return turn.user
    head = [{"role": "system", "content": session.system}] if session.system else []
    return head + history + [{"role": "user", "content": turn.user}]


def completion_prompt(messages: list[dict]) -> str:
    """The conversation as plain text, for servers driven through /v1/completions."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"
