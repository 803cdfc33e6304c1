"""visattn: see what the attention layers of vision models look at."""
from visattn._version import __version__
from visattn.ablation import ablate, head_importance, patch, patching_effects
from visattn.breaking import broken
from visattn.errors import CheckpointError, ImageError, TrainingError, VisattnError
from visattn.models import create_model, list_models
from visattn.sources import load_model
from visattn.sites import AttentionSite, ChannelSite, SpatialSite
from visattn.tracing import CaptureWarning, Trace, capture


__all__ = [
    "capture", "Trace", "ablate", "head_importance", "patch", "patching_effects", "broken", "AttentionSite", "ChannelSite", "SpatialSite",
    "CaptureWarning", "create_model", "list_models", "load_model",
    "VisattnError", "ImageError", "CheckpointError", "TrainingError",
]
