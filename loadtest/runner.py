"""Drive a workload: arrivals, concurrency, warm-up, and a bound on requests or time.

Sessions arrive at `request_rate` per second (Poisson, or gamma with a burstiness factor:
below 1 burstier, above 1 steadier), or all at once when the rate is infinite. At most
`max_concurrency` requests are in flight. The run stops issuing at `num_prompts`
requests or after `duration_s`, and always ends: every request ends by its own timeout,
and a duration-bound run cancels whatever is left (a session still thinking) a timeout
after it stopped issuing.
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


def intervals(rate: float, burstiness: float, rng: random.Random):
    """Seconds between arrivals: gamma with shape `burstiness` and mean 1/rate (burstiness 1 is Poisson)."""
    while True:
        yield 0.0 if math.isinf(rate) else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


async def run_load(target: Target, sessions: list[Session], cfg: LoadConfig,
                   on_result: Callable[[RequestResult], None] | None = None) -> LoadResult:
    rng = random.Random(cfg.seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        for s in sessions[: cfg.num_warmups]:  # warm-up: first turns, one at a time, not counted
            turn = s.turns[0]
            await send(http, target, _prompt(target, s, [], turn), min(turn.max_tokens, 16))
        return await _measured(http, target, sessions, cfg, rng, on_result)


def _prompt(target: Target, session: Session, history: list[dict], turn) -> str | list[dict]:
    messages = chat_messages(session, history, turn)
    return messages if target.chat else completion_prompt(messages)


async def _measured(http, target, sessions, cfg, rng, on_result) -> LoadResult:
    budget = cfg.num_prompts if cfg.num_prompts is not None else math.inf
    start = time.monotonic()
    stop_issuing = start + cfg.duration_s if cfg.duration_s is not None else math.inf
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    results: list[RequestResult] = []
    issued = 0

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
            r = await send(http, target, prompt, max_tokens)
        finally:
            if slots is not None:
                slots.release()
        results.append(r)
        if on_result is not None:
            on_result(r)
        return r

    async def run_session(s: Session) -> None:
        history: list[dict] = []
        for i, turn in enumerate(s.turns):
            if i and s.think_time_s:
                await asyncio.sleep(s.think_time_s[i - 1])
            r = await one(_prompt(target, s, history, turn), turn.max_tokens)
            if r is None or not r.ok:
                return
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
    _, pending = await asyncio.wait(tasks, timeout=hard_stop) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return LoadResult(results, time.monotonic() - start, cfg)
