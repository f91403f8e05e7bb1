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
    # The output resolutions the checkpoint was trained at, as (lowest, highest) side of a
    # square of the same area (the release trains buckets of equal area at several aspect
    # ratios). (0, 0): no declared range (a custom config), nothing is refused or windowed
    # by it. See docs/windows.md.
    trained_res: tuple[int, int] = (0, 0)

    def __post_init__(self):
        object.__setattr__(self, "trained_res", tuple(self.trained_res))   # JSON metadata brings a list
        if len(self.trained_res) != 2 or not 0 <= self.trained_res[0] <= self.trained_res[1]:
            raise ValueError(f"PiDConfig.trained_res must be (lowest, highest) output side, got {self.trained_res!r}")
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


# Trained output resolutions per release family (the release's training configs): the
# "res2k" checkpoints at 2048 (multi-aspect buckets of 2048² area; 1024 is the smallest
# side a window may take), the "res2kto4k" ones from 2048 to 3840, evaluated at 4096.
RES_2K = (1024, 2048)
RES_2KTO4K = (2048, 4096)


def _released(name, channels, stride, unpack=1, sr=4, version="v1"):
    res = RES_2KTO4K if "2kto4k" in name else RES_2K
    return PiDConfig(name=name, latent_channels=channels, latent_stride=stride,
                     unpack=unpack, sr_scale=sr, version=version, trained_res=res)


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


# The three undistilled v1.5 checkpoints: the teachers of the distilled v1.5 ones, the same
# networks (keys and shapes) in the same layout; only their name says which they are.
UNDISTILLED_DIRS: dict[str, str] = {
    "flux-2kto4k-v1.5": "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled",
    "flux2-2kto4k-v1.5": "PiD_v1pt5_res2kto4k_sr4x_official_flux2_undistilled",
    "qwenimage-2kto4k-v1.5": "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled",
}


def release_names() -> dict[str, tuple[str, bool]]:
    """Every released checkpoint's name -> (preset, distilled)."""
    names = {d: (p, True) for p, d in RELEASE_DIRS.items()}
    names.update({d: (p, False) for p, d in UNDISTILLED_DIRS.items()})
    return names


@dataclass(frozen=True)
class ShiftRule:
    """The flow shift of DPM-Solver++ when none is given: `static`, or with `base_shift`
    the release's dynamic rule base_shift * sqrt(sqrt(H*W) / base_size) of the output size."""
    static: float
    base_shift: float | None = None
    base_size: int | None = None

    def shift(self, h: int, w: int) -> float:
        if self.base_shift is None:
            return self.static
        return self.base_shift * math.sqrt(math.sqrt(h * w) / self.base_size)

    def __str__(self):
        if self.base_shift is None:
            return f"{self.static:g}"
        return f"{self.base_shift:g} * sqrt(sqrt(H*W) / {self.base_size})"


@dataclass(frozen=True)
class Sampling:
    """How a checkpoint decodes when a decode names nothing (docs/samplers.md says where
    each value comes from). distilled: trained for the 4-step sampler ("sde"); otherwise
    for DPM-Solver++ ("dpm++") with guidance. `dpm_steps`, `cfg`, `shift` are the
    DPM-Solver++ defaults (the release's inference configs carry them for every checkpoint)."""
    distilled: bool = True
    dpm_steps: int = 25
    cfg: float = 5.0
    shift: ShiftRule = ShiftRule(6.0)

    @property
    def sampler(self) -> str:
        return "sde" if self.distilled else "dpm++"

    @property
    def steps(self) -> int:
        return 4 if self.distilled else self.dpm_steps

    def steps_for(self, sampler: str | None) -> int:
        """The default step count of `sampler` (None: this checkpoint's own sampler)."""
        return self.dpm_steps if (sampler or self.sampler) == "dpm++" else 4

    def describe(self) -> str:
        if self.distilled:
            return "distilled: 4-step sampler (sde)"
        return f"undistilled: dpm++, {self.dpm_steps} steps, cfg {self.cfg:g}, shift {self.shift}"


# The release's inference configs: shift 6 everywhere; the 2kto4k ones a dynamic rule
# (v1: base 4 at 1024, v1.5: base 6 at 2048), which wins over the static value.
SHIFT_RULES: dict[str, ShiftRule] = {
    **{name: ShiftRule(6.0) for name in ("flux-2k", "sd3-2k", "flux2-2k", "dinov2-2k", "siglip-2k")},
    **{name: ShiftRule(6.0, 4.0, 1024) for name in ("sd3-2kto4k", "sdxl-2kto4k")},
    **{name: ShiftRule(6.0, 6.0, 2048) for name in UNDISTILLED_DIRS},
}


def sampling_for(cfg: PiDConfig, distilled: bool = True) -> Sampling:
    """The defaults of a checkpoint of `cfg` (a custom config: the v1.5 rule for v1.5, else v1 2k)."""
    rule = SHIFT_RULES.get(cfg.name) or (ShiftRule(6.0, 6.0, 2048) if cfg.is_v15 else ShiftRule(6.0))
    return Sampling(distilled=distilled, shift=rule)


def get_preset(name: str) -> PiDConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset={name!r} is not a known preset; expected one of {sorted(PRESETS)}") from None


# 2k: 128..256 px, 2kto4k: 256..512 px; a flux tiny latent cell is 32 px.
TINY_RES_DIV = 8


def tiny(base: str = "flux-2k", **overrides) -> PiDConfig:
    """A small config of the same shape rules for tests: D=64, 2 patch blocks.

    Only widths shrink; every structural switch (version, unpack, strides) is the
    base preset's, so a tiny model exercises the same code paths. The trained range
    shrinks by TINY_RES_DIV, so windows of a few latent cells are legal on a CPU.
    """
    lo, hi = get_preset(base).trained_res
    small = dict(hidden=64, heads=4, patch_blocks=2, pixel_blocks=2, patch=8, pixel_dim=16,
                 pixel_attn_dim=64, pixel_heads=4, pixel_mlp_hidden=64, mlp_hidden=96,
                 text_dim=40, max_text=24, time_freq_dim=32, adapter_hidden=32,
                 trained_res=(lo // TINY_RES_DIV, hi // TINY_RES_DIV))
    small.update(overrides)
    return replace(get_preset(base), name=f"tiny-{base}", **small)
