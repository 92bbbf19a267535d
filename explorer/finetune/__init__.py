"""Fine-tuning and linear probes on accelerate: one engine for the tab, the CLI and the bench.

    from explorer.finetune import FinetuneConfig, run_finetune
    for event in run_finetune(fresh_model, train_set, val_set, FinetuneConfig(mode="linear")):
        print(event.stage, event.done, event.total, event.metrics)
"""

from explorer.finetune.checkpoint import save_checkpoint, zip_checkpoint
from explorer.finetune.engine import (
    MODES,
    FinetuneConfig,
    FinetuneResult,
    TrainEvent,
    finetune,
    run_finetune,
)
from explorer.finetune.probe import FEATURE_CACHE, LayerwiseProbe, layerwise_probe
from explorer.finetune.resolution import position_similarity_map, set_resolution

__all__ = [
    "FEATURE_CACHE",
    "MODES",
    "FinetuneConfig",
    "FinetuneResult",
    "LayerwiseProbe",
    "TrainEvent",
    "finetune",
    "layerwise_probe",
    "position_similarity_map",
    "run_finetune",
    "save_checkpoint",
    "set_resolution",
    "zip_checkpoint",
]
