"""Work that must not hold the event loop (tokenizing megabytes, compiling a grammar) runs in its thread pool."""
from __future__ import annotations

import asyncio


async def off_loop(fn, *args):
    """Run fn in the loop's thread pool, so that no other client waits on it."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
