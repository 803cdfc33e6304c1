"""visattn: see what the attention layers of vision models look at."""
from visattn.capture import AttentionSite, ChannelSite, SpatialSite, Trace, capture
from visattn.errors import CheckpointError, ImageError, TrainingError, VisattnError
from visattn.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "capture", "Trace", "AttentionSite", "ChannelSite", "SpatialSite",
    "create_model", "list_models",
    "VisattnError", "ImageError", "CheckpointError", "TrainingError",
]
