"""The model engine: checkpoint loading, stages, transport, sampling and the offline API.

This module is the engine's face: the gateway imports nothing from engine's submodules but the names exported
here (tests/test_layout.py holds it to that).
"""
from batching.sampling_params import SamplingParams
from engine.errors import CheckpointError, EngineDeadError
from engine.outputs import CompletionOutput, SeqDelta, TokenLogprob
from engine.pipeline.thread_policy import background_this_thread
from engine.stats import EngineInfo, EngineStats, StageInfo, StageLoad

# Lazy, so that `import engine.pipeline.worker` in a stage process does not drag in tokenizers, and the gateway's
# start-up pays for torch only where it uses it.
_LAZY = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineConfig": "engine.llm_engine",
    "default_model": "engine.model.default_model",
    "parse_size": "engine.placement",
    "PlacementError": "engine.placement",
    "plan_here": "engine.placement.planning",
    "convert": "engine.converter",
    "plan_json": "engine.placement",
    "plan_table": "engine.placement",
    "peer_table": "engine.placement",
    "throughput": "engine.placement",
    "add_stage_args": "engine.pipeline.launch",
    "add_worker_args": "engine.pipeline.launch",
    "start_ahead": "engine.pipeline.launch",
    "is_repo_id": "engine.model.hub",
    "probe_note": "engine.placement.devices",
    "run_worker": "engine.pipeline.worker",
    "describe_layers": "engine.model.weight_formats",
    "GrammarCompiler": "engine.model.grammar",
    "GrammarError": "engine.model.grammar",
    "json_schema_grammar": "engine.model.grammar",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["SamplingParams", "CheckpointError", "EngineDeadError", "CompletionOutput", "SeqDelta", "TokenLogprob",
           "EngineInfo", "EngineStats", "StageInfo", "StageLoad", "background_this_thread", *_LAZY]
