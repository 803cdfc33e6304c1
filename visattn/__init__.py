"""visattn: see what the attention layers of vision models look at."""
from visattn.ablation import ablate, head_importance, patch, patching_effects
from visattn.errors import CheckpointError, ImageError, TrainingError, VisattnError
from visattn.models import create_model, list_models
from visattn.sources import load_model
from visattn.tracing import AttentionSite, CaptureWarning, ChannelSite, SpatialSite, Trace, capture

__version__ = "0.1.0"

__all__ = [
    "capture", "Trace", "ablate", "head_importance", "patch", "patching_effects", "AttentionSite", "ChannelSite", "SpatialSite",
    "CaptureWarning", "create_model", "list_models", "load_model",
    "VisattnError", "ImageError", "CheckpointError", "TrainingError",
]
