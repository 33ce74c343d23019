"""Drive a workload: arrivals, concurrency, warm-up, and a bound on requests or time.

Sessions arrive at `request_rate` per second (Poisson, or gamma with a burstiness factor:
below 1 burstier, above 1 steadier), or all at once when the rate is infinite. At most
`max_concurrency` requests are in flight. The run stops issuing at `num_prompts`
requests or after `duration_s`, and always ends: every request ends by its own timeout,
and a duration-bound run cancels whatever is left (a session still thinking) a timeout
after it stopped issuing. Every request issued is in the results: one still running when
the run ends (cut, or interrupted with Ctrl-C) as a failure of kind `cut`. A conversation
whose history would outgrow the served model's context (`max_model_len`) drops its oldest
exchanges first, as a chat client does.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from loadtest.client import RequestResult, Target, send
from loadtest.workloads import Session, chat_messages, completion_prompt


@dataclass(slots=True)
class LoadConfig:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_prompts: int | None = 100
    duration_s: float | None = None
    num_warmups: int = 0
    seed: int = 0
    max_model_len: int | None = None  # the served model's context, which conversations are kept within

    def __post_init__(self) -> None:
        if self.num_prompts is None and self.duration_s is None:
            raise ValueError("give --num-prompts or --duration, or the run would never end")
        if self.request_rate <= 0 or self.burstiness <= 0:
            raise ValueError("--request-rate and --burstiness must be positive")


@dataclass(slots=True)
class LoadResult:
    results: list[RequestResult]
    duration_s: float
    config: LoadConfig
    started: float = 0.0  # monotonic seconds the measured part began at
    interrupted: bool = False

    def cut_short(self) -> LoadResult:
        """What a run stopped part-way (Ctrl-C) has measured so far."""
        self.duration_s = time.monotonic() - (self.started or time.monotonic())
        self.interrupted = True
        return self


def intervals(rate: float, burstiness: float, rng: random.Random):
    """Seconds between arrivals: gamma with shape `burstiness` and mean 1/rate (burstiness 1 is Poisson)."""
    while True:
        yield 0.0 if math.isinf(rate) else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


async def run_load(target: Target, sessions: list[Session], cfg: LoadConfig,
                   on_result: Callable[[RequestResult], None] | None = None,
                   into: LoadResult | None = None) -> LoadResult:
    """into: where the results go as they come, for a caller to read what a run stopped part-way measured."""
    rng = random.Random(cfg.seed)
    out = into if into is not None else LoadResult([], 0.0, cfg)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        for s in sessions[: cfg.num_warmups]:  # warm-up: first turns, one at a time, not counted
            turn = s.turns[0]
            await send(http, target, _prompt(target, s, [], turn), min(turn.max_tokens, 16))
        return await _measured(http, target, sessions, cfg, rng, on_result, out)


def _prompt(target: Target, session: Session, history: list[dict], turn) -> str | list[dict]:
    if session.raw and not target.chat:
        return turn.user
    messages = chat_messages(session, history, turn)
    return messages if target.chat else completion_prompt(messages)


# Tokens per character of a prompt before the server has counted one (more than any common tokenizer spends, so a
# first guess trims too much rather than too little), and the room kept for what a chat template adds.
FIRST_TOKENS_PER_CHAR = 0.5
TEMPLATE_SLACK = 1.1


def _chars(prompt: str | list[dict]) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content") or "")) for m in prompt)


def fitted(target: Target, session: Session, history: list[dict], turn, limit: int | None,
           tokens_per_char: float | None) -> tuple[str | list[dict] | None, int]:
    """The turn's prompt and max_tokens within the context: the oldest exchanges of the history dropped (from it,
    for the turns after too) until the prompt, priced at the tokens per character the server counted last, and the
    answer fit; else the answer shortened. (None, 0) where even the turn alone does not fit."""
    max_tokens = turn.max_tokens
    prompt = _prompt(target, session, history, turn)
    if limit is None or session.raw:  # a prompt of a known length is the server's to judge
        return prompt, max_tokens
    rate = tokens_per_char or FIRST_TOKENS_PER_CHAR
    while rate * _chars(prompt) * TEMPLATE_SLACK + max_tokens > limit and history:
        del history[:2]
        prompt = _prompt(target, session, history, turn)
    room = int(limit - rate * _chars(prompt) * TEMPLATE_SLACK)
    if room < 1:
        return None, 0
    return prompt, min(max_tokens, room)


async def _measured(http, target, sessions, cfg, rng, on_result, out: LoadResult) -> LoadResult:
    budget = cfg.num_prompts if cfg.num_prompts is not None else math.inf
    start = out.started = time.monotonic()
    stop_issuing = start + cfg.duration_s if cfg.duration_s is not None else math.inf
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    results = out.results
    issued = 0
    tokens_per_char: float | None = None  # the server's count over a prompt's characters, the last it reported

    def may_issue() -> bool:
        return issued < budget and time.monotonic() < stop_issuing

    async def one(prompt, max_tokens: int) -> RequestResult | None:
        nonlocal issued
        if slots is not None:
            await slots.acquire()
        try:
            if not may_issue():
                return None
            issued += 1
            began = time.monotonic()
            try:
                r = await send(http, target, prompt, max_tokens)
            except asyncio.CancelledError:  # the run ended (its hard stop, or Ctrl-C) with this one in flight
                results.append(RequestResult(start=began, latency=time.monotonic() - began, error="cut",
                                             detail="still running when the run ended"))
                raise
        finally:
            if slots is not None:
                slots.release()
        results.append(r)
        if on_result is not None:
            on_result(r)
        return r

    async def run_session(s: Session) -> None:
        nonlocal tokens_per_char
        history: list[dict] = []
        for i, turn in enumerate(s.turns):
            if i and s.think_time_s:
                await asyncio.sleep(s.think_time_s[i - 1])
            prompt, max_tokens = fitted(target, s, history, turn, cfg.max_model_len, tokens_per_char)
            if prompt is None:  # not sent, but said: the turn alone outgrows the served context
                results.append(RequestResult(start=time.monotonic(), error="too_long",
                                             detail=f"the turn alone would not fit {cfg.max_model_len} tokens"))
                await asyncio.sleep(0)  # a loop of sessions that send nothing must still let the others run
                return
            r = await one(prompt, max_tokens)
            if r is None or not r.ok:
                return
            if r.prompt_tokens:
                tokens_per_char = r.prompt_tokens / max(_chars(prompt), 1)
            if isinstance(turn.user, str):
                history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": r.text}]

    source = itertools.cycle(sessions) if cfg.duration_s is not None else iter(sessions)
    tasks: list[asyncio.Task] = []
    if math.isinf(cfg.request_rate):
        # All at once: as many session loops as requests may be in flight, each taking the next session.
        async def loop() -> None:
            for s in source:
                if not may_issue():
                    return
                await run_session(s)

        width = cfg.max_concurrency or len(sessions)
        tasks = [asyncio.create_task(loop()) for _ in range(max(1, width))]
    else:
        gaps = intervals(cfg.request_rate, cfg.burstiness, rng)
        for s in source:
            if not may_issue():
                break
            tasks.append(asyncio.create_task(run_session(s)))
            await asyncio.sleep(min(next(gaps), max(0.0, stop_issuing - time.monotonic())))
    # Every request ends by its own timeout; a duration-bound run also gets a hard stop a timeout after it stops
    # issuing, so a session still thinking or a server that never closes cannot keep it alive.
    hard_stop = None if cfg.duration_s is None else max(0.0, stop_issuing + target.timeout_s + 1 - time.monotonic())
    try:
        _, pending = await asyncio.wait(tasks, timeout=hard_stop) if tasks else (set(), set())
    except asyncio.CancelledError:  # Ctrl-C: what is in flight is counted as cut, over its still-open connections
        pending = {t for t in tasks if not t.done()}
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out.duration_s = time.monotonic() - start
    return out
