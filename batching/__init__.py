"""Continuous batching in plain Python (no torch): sequences, KV blocks, the scheduler."""
from batching.batch import PENDING, Batch, SeqInit, SeqWork, StepOutput, TokensForFirstStage
from batching.block_manager import BlockManager
from batching.sampling_params import ParamError, SamplingParams
from batching.scheduler import Scheduler, SchedulerConfig, SeqUpdate
from batching.sequence import FinishReason, Sequence, SequenceStatus

__all__ = [
    "PENDING", "Batch", "SeqInit", "SeqWork", "StepOutput", "TokensForFirstStage", "BlockManager", "ParamError",
    "SamplingParams",
    "Scheduler", "SchedulerConfig", "SeqUpdate", "FinishReason", "Sequence", "SequenceStatus",
]
