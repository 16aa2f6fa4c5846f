"""Model zoo: CvT-13/21/W24 and CeiT-T/S/B with the official parameter names."""
from .factory import (EvalConfig, ModelConfig, build_model, create_model, eval_config, list_models,
                      weight_decay_groups)
from .ceit import CeiT, resize_pos_embed  # importing the families registers their variants
from .cvt import CvT
from .weights import (CheckpointError, load_pretrained, model_from_export, read_checkpoint,
                      save_export)

__all__ = ["CeiT", "CvT", "EvalConfig", "ModelConfig", "build_model", "create_model", "eval_config", "list_models",
           "CheckpointError", "load_pretrained", "model_from_export", "read_checkpoint", "resize_pos_embed", "save_export",
           "weight_decay_groups"]
