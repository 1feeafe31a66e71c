"""Fine-tuning tasks on pretrained encoders.

:mod:`medssl.tasks.finetune` holds the machinery every task shares (pretrained-encoder loading with a strict key
map, fine-tune modes, layer-wise LR decay, labelled subsets, the supervised adapter for the engine's trainer,
evaluation reports); each task has its own module (:mod:`medssl.tasks.segmentation`, ...).
"""

from medssl.tasks.finetune import (
    FINETUNE_MODES,
    EncoderTaskNetwork,
    SupervisedTask,
    layer_decay_param_groups,
    load_pretrained_encoder,
    report_evaluation,
    select_labelled,
)

__all__ = [
    "FINETUNE_MODES",
    "EncoderTaskNetwork",
    "SupervisedTask",
    "layer_decay_param_groups",
    "load_pretrained_encoder",
    "report_evaluation",
    "select_labelled",
]
