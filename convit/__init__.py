"""ConViT with fused GPSA kernels.

    >>> import convit
    >>> model = convit.create_model("convit_small", gpsa_backend="auto")
    >>> convit.load_checkpoint(model, "convit_small.pth")      # official, timm or ours
    >>> convit.swap_gpsa(timm_model, backend="triton")          # speed up a model you already have
"""
from .weights import load_checkpoint
from .models import ConViT, GPSA, MHSA, create_model, list_models
from .swap import swap_gpsa

__all__ = ["ConViT", "GPSA", "MHSA", "create_model", "list_models", "load_checkpoint", "swap_gpsa"]
