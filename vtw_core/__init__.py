"""vtw_core: Visual Tokens Withdrawal for LLaVA-style multimodal LLMs on stock transformers."""

from vtw_core.errors import InputError, UnsupportedModelError, VTWError

__all__ = ["InputError", "UnsupportedModelError", "VTWError"]
