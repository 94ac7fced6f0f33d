"""The shared request scheduler: used by the inference engine and by the discrete-event simulator.

Pure Python (no torch, no numpy) so simulated requests that carry only token counts can be scheduled
with exactly the logic the real engine uses.
"""

from .block_manager import BlockManager
from .scheduler import Batch, ScheduledSeq, Scheduler, SchedulerConfig, SchedulerStats
from .sequence import Sequence, SequenceStatus

__all__ = [
    "Batch",
    "BlockManager",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "Sequence",
    "SequenceStatus",
]
