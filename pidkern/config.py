"""Architecture numbers of PiD as frozen dataclasses, and the ten released presets.

Every number the network needs lives in `PiDConfig`; nothing else in the package
hard-codes a width. The presets are the ten released checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PiDConfig:
    name: str
    latent_channels: int          # channels of the latent the generator produces
    latent_stride: int            # pixels of the generator's own image per latent cell
    unpack: int = 1               # FLUX.2 v1.5 packs 2x2 cells into channels
    sr_scale: int = 4             # output size / the generator's own image size
    version: str = "v1"           # "v1" or "v1.5"
    hidden: int = 1536            # D
    heads: int = 24
    patch_blocks: int = 14
    pixel_blocks: int = 2
    patch: int = 16               # P
    pixel_dim: int = 16           # Dp
    pixel_attn_dim: int = 1152
    pixel_heads: int = 16
    pixel_mlp_hidden: int = 64
    mlp_hidden: int = 4096
    text_dim: int = 2304
    max_text: int = 300
    time_freq_dim: int = 256
    adapter_res_blocks: int = 4
    adapter_groups: int = 4
    lq_every: int = 2             # an adapter gate before every 2nd patch block
    adapter_hidden: int = 0       # Hd; 0 means the version's width (512 v1, 1024 v1.5)
    rms_eps: float = 1e-6
    gn_eps: float = 1e-5

    def __post_init__(self):
        if self.version not in ("v1", "v1.5"):
            raise ValueError(f"PiDConfig.version must be 'v1' or 'v1.5', got {self.version!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 4:
            raise ValueError(f"hidden={self.hidden} / heads={self.heads} must give a head dim divisible by 4 (2-D RoPE)")
        if self.pixel_attn_dim % self.pixel_heads or (self.pixel_attn_dim // self.pixel_heads) % 4:
            raise ValueError(f"pixel_attn_dim={self.pixel_attn_dim} / pixel_heads={self.pixel_heads} must give a head dim divisible by 4")
        if self.pixel_dim % 4:
            raise ValueError(f"pixel_dim={self.pixel_dim} must be divisible by 4 (sin-cos table)")

    # Derived numbers: properties, so a config can never disagree with itself.
    @property
    def is_v15(self) -> bool:
        return self.version == "v1.5"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def pixel_head_dim(self) -> int:
        return self.pixel_attn_dim // self.pixel_heads

    @property
    def pixels_per_patch(self) -> int:  # P2
        return self.patch * self.patch

    @property
    def adapter_width(self) -> int:  # Hd
        if self.adapter_hidden:
            return self.adapter_hidden
        return 1024 if self.is_v15 else 512

    @property
    def rope_ref_grid(self) -> int:
        return 128 if self.is_v15 else 64

    @property
    def adapter_padding(self) -> str:
        return "replicate" if self.is_v15 else "zeros"

    @property
    def num_lq_heads(self) -> int:
        return len(range(0, self.patch_blocks, self.lq_every))

    @property
    def adapter_in_channels(self) -> int:
        """Channels entering the adapter after unpacking and any space-to-depth."""
        unpacked = self.latent_channels // (self.unpack * self.unpack)
        num, den = self.grid_ratio
        return unpacked * (den // num) ** 2 if num < den else unpacked

    @property
    def grid_ratio(self) -> tuple[int, int]:
        """r = sr_scale * stride_eff / patch as (numerator, denominator): patch cells per latent cell."""
        num, den = self.sr_scale * self.latent_stride, self.unpack * self.patch
        g = math.gcd(num, den)
        return num // g, den // g

    @property
    def upscale(self) -> int:
        """Output pixels per latent cell along one side (latent stride x sr scale)."""
        return self.latent_stride * self.sr_scale

    def output_size(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        return latent_h * self.upscale, latent_w * self.upscale


def _released(name, channels, stride, unpack=1, sr=4, version="v1"):
    return PiDConfig(name=name, latent_channels=channels, latent_stride=stride,
                     unpack=unpack, sr_scale=sr, version=version)


PRESETS: dict[str, PiDConfig] = {c.name: c for c in (
    _released("flux-2k", 16, 8),
    _released("sd3-2k", 16, 8),
    _released("sd3-2kto4k", 16, 8),
    _released("sdxl-2kto4k", 4, 8),
    _released("flux2-2k", 128, 16),
    _released("dinov2-2k", 768, 16),
    _released("siglip-2k", 1152, 16, sr=8),
    _released("flux-2kto4k-v1.5", 16, 8, version="v1.5"),
    _released("flux2-2kto4k-v1.5", 128, 16, unpack=2, version="v1.5"),
    _released("qwenimage-2kto4k-v1.5", 16, 8, version="v1.5"),
)}

# Directory names of the released checkpoints, so a path can name its preset.
RELEASE_DIRS: dict[str, str] = {
    "flux-2k": "PiD_res2k_sr4x_official_flux_distill_4step",
    "sd3-2k": "PiD_res2k_sr4x_official_sd3_distill_4step",
    "sd3-2kto4k": "PiD_res2kto4k_sr4x_official_sd3_distill_4step",
    "sdxl-2kto4k": "PiD_res2kto4k_sr4x_official_sdxl_distill_4step",
    "flux2-2k": "PiD_res2k_sr4x_official_flux2_distill_4step",
    "dinov2-2k": "PiD_res2k_sr4x_official_dinov2_distill_4step",
    "siglip-2k": "PiD_res2k_sr8x_official_siglip_distill_4step",
    "flux-2kto4k-v1.5": "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step",
    "flux2-2kto4k-v1.5": "PiD_v1pt5_res2kto4k_sr4x_official_flux2_distill_4step",
    "qwenimage-2kto4k-v1.5": "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_distill_4step",
}


def get_preset(name: str) -> PiDConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset={name!r} is not a known preset; expected one of {sorted(PRESETS)}") from None


def tiny(base: str = "flux-2k", **overrides) -> PiDConfig:
    """A small config of the same shape rules for tests: D=64, 2 patch blocks.

    Only widths shrink; every structural switch (version, unpack, strides) is the
    base preset's, so a tiny model exercises the same code paths.
    """
    small = dict(hidden=64, heads=4, patch_blocks=2, pixel_blocks=2, patch=8, pixel_dim=16,
                 pixel_attn_dim=64, pixel_heads=4, pixel_mlp_hidden=64, mlp_hidden=96,
                 text_dim=40, max_text=24, time_freq_dim=32, adapter_hidden=32)
    small.update(overrides)
    return replace(get_preset(base), name=f"tiny-{base}", **small)
