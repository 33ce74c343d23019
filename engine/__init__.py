"""The model engine: checkpoint loading, stages, transport, sampling and the offline API.

This module is the engine's face: the gateway imports nothing from engine's submodules but the names exported
here (tests/test_layout.py holds it to that).
"""
from batching.sampling_params import SamplingParams
from engine.errors import CheckpointError, EngineDeadError
from engine.outputs import CompletionOutput, SeqDelta, TokenLogprob
from engine.stats import EngineInfo, EngineStats, StageInfo, StageLoad
from engine.thread_policy import background_this_thread

# Lazy, so that `import engine.stage` in a stage process does not drag in tokenizers, and the gateway's start-up
# pays for torch and OpenTelemetry only where it uses them.
_LAZY = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.llm_engine",
    "Tracing": "engine.tracing",
    "ensure_demo_model": "engine.demo_model",
    "parse_size": "engine.device",
    "PlacementError": "engine.placement",
    "plan_here": "engine.planning",
    "add_worker_args": "engine.stage",
    "run_worker": "engine.stage",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["SamplingParams", "CheckpointError", "EngineDeadError", "CompletionOutput", "SeqDelta", "TokenLogprob",
           "EngineInfo", "EngineStats", "StageInfo", "StageLoad", "background_this_thread", *_LAZY]
