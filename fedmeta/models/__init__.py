"""Models: one encoder per modality, a fusion layer, and a head."""

from fedmeta.models.multimodal import MultimodalNet, build_model

__all__ = ["MultimodalNet", "build_model"]
