"""pidkern: fast, dependable inference for PiD, the pixel-diffusion decoder.

    import pidkern
    dec = pidkern.load("flux-2k")                  # the released weights, via the Hugging Face cache
    image = dec.decode(latent, sigma)              # [B, 3, H, W] in [-1, 1]
    pidkern.save_png(image, "out.png")

`pidkern.decode(latent, sigma)` reuses the Decoder `load` returned last; see README.md.
"""
from .api import BACKENDS, Decoder, decode, load, save_png, to_pil, to_uint8
from .config import PRESETS, PiDConfig, get_preset
from .memory import InsufficientMemoryError, estimate_memory
from . import hub, images, latents
from .latents import preset_for

__version__ = "0.1.0"
__all__ = ["BACKENDS", "CaptionEncoder", "Decoder", "InsufficientMemoryError", "PRESETS", "PiDConfig", "decode",
           "estimate_memory", "get_preset", "hub", "images", "latents", "load", "preset_for", "save_png", "to_pil", "to_uint8",
           "__version__"]

# Entry points imported on first use, so that `import pidkern` never loads the optional
# stacks: transformers (CaptionEncoder, pip install "pidkern[text]") and diffusers
# (generate / upscale, pip install "pidkern[diffusers]").
_PIPELINES = ("generate", "decode_pipeline_latents", "upscale")
__all__ += list(_PIPELINES)


def __getattr__(name):
    if name == "CaptionEncoder":
        from .text import CaptionEncoder
        return CaptionEncoder
    if name in _PIPELINES:
        from . import pipelines
        return getattr(pipelines, name)
    raise AttributeError(f"module 'pidkern' has no attribute {name!r}")
