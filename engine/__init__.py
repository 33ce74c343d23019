"""The model engine: checkpoint loading, stages, transport, sampling and the offline API."""
from batching.sampling_params import SamplingParams
from engine.errors import CheckpointError, EngineDeadError
from engine.outputs import CompletionOutput, SeqDelta, TokenLogprob
from engine.stats import EngineInfo, EngineStats, StageInfo, StageLoad
from engine.thread_policy import background_this_thread


def __getattr__(name: str):
    # Lazy, so that `import engine.stage` in a stage process does not drag in tokenizers.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name in ("LLMEngine", "EngineConfig"):
        from engine import llm_engine

        return getattr(llm_engine, name)
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "CheckpointError", "EngineDeadError",
           "CompletionOutput", "SeqDelta", "TokenLogprob", "EngineInfo", "EngineStats", "StageInfo", "StageLoad",
           "background_this_thread"]
