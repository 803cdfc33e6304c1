"""Model registry; importing this package registers every family."""
from visattn.models import cbam_cnn, hybrid_vit, sa_cnn, seed_cnn, tv_vit  # noqa: F401  (registration)
from visattn.models.registry import config_class, create_model, list_models, make_config, register_model

__all__ = ["create_model", "list_models", "register_model", "config_class", "make_config"]
