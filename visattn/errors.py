"""The library's exception types: every refusal a user can trigger is one of these."""


class VisattnError(Exception):
    """Base class for every error the library raises on purpose (one-line message)."""


class ImageError(VisattnError):
    """An image that cannot be used: empty, corrupt, not an image, or too large."""


class CheckpointError(VisattnError):
    """A checkpoint that cannot be loaded: not safetensors, unknown model, wrong shapes."""


class TrainingError(VisattnError):
    """A training run that cannot go on (non-finite loss, unwritable output)."""


class WriteError(VisattnError):
    """A file that could not be written (full disk, no permission); the previous version is kept."""


class ExplainError(VisattnError, ValueError):
    """An explanation that cannot be computed (unknown layer, no layer to hook)."""
