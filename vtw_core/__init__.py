"""vtw_core: Visual Tokens Withdrawal for LLaVA-style multimodal LLMs on stock transformers."""

from vtw_core.errors import InputError, ResourceError, UnsupportedModelError, VTWError

__all__ = ["InputError", "ResourceError", "UnsupportedModelError", "VTWError"]
