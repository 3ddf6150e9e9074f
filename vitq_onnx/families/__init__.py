"""Model families, registered like timm's models: one module per family holds what is specific to it.

A family says which attention modules it instruments and gives their forward with quant points
(timm's non-fused path: the same ops in the same order, so the exported graph is the FP model's,
with q, k, the softmax output and v passed through the module's ``vq_*`` points), which
LayerNorm -> Linear pairs of its blocks RepQ-ViT's channel-wise fold may use, how a checkpoint
saved at another input size is made to fit, and its short names for ``--model``. ``calibration/quant_points.py`` asks the registry for every module.

Family modules import nothing heavy at import time (torch and timm only inside functions), so
the command line lists their names without loading torch.

    @register_family
    class MyFamily(Family):
        name = "my_vit"
        ...
"""

from .registry import (FAMILIES, Family, adapt_checkpoint, block_rows, prepare, register_family, short_names,
                       supported)
from . import vit, swin, beit, eva, swin_v2, tiny_vit, cait, pvt_v2, siglip, hf  # noqa: E402,F401  (registers the families, in this order)

__all__ = ["FAMILIES", "Family", "adapt_checkpoint", "block_rows", "prepare", "register_family", "short_names", "supported"]
