"""G2D model package.

    config.py       ModelConfig (every paper-vs-code switch; docs/method.md tabulates them)
    image.py        smp U-Net + projector + attention pool, encoder initialisation
    text.py         BERT with a frozen, autograd-free prefix + token projector; tiny BERT builder
    pseudo_mask.py  attention -> binary pseudo segmentation targets
    losses.py       InfoNCE (optionally with global negatives), pseudo-seg losses, retrieval top-k
    g2d.py          G2DModel: the whole training forward
    registry.py     named configs + build_model
    export.py       encoder / encoder+decoder state dicts for downstream U-Nets

Names are re-exported lazily, so `import model.losses` does not import transformers or smp.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "model.config",
    "G2DModel": "model.g2d",
    "G2DOutput": "model.g2d",
    "MODEL_CONFIGS": "model.registry",
    "build_model": "model.registry",
    "model_config": "model.registry",
    "export_unet_state_dicts": "model.export",
    "load_encoder_into_unet": "model.export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
