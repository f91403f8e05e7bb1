"""The inputs of one decode, checked: what `Decoder.prepare` returns and every decode path
(reference, fast engine, sequence-parallel) takes.

A frozen dataclass rather than a dict splatted into calls, so the data flow can be
followed by reading. A feature that needs a new input (a decode window, a negative
caption for guidance) adds a field with a default here and reads it where it is used;
the paths that do not know it are unaffected.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class DecodeInputs:
    latent: torch.Tensor          # [B, C, h, w] float32 on the decoder's device
    sigma: torch.Tensor           # [B] float32: the latent's noise level
    text: torch.Tensor            # [B, T, text_dim] float32 caption embeddings
    steps: int                    # 1..4 of the distilled schedule
    seed: int | None              # the noise stream's seed (None: drawn once, see sampler.resolve_seed)
    size: tuple                   # (H, W) of the output image
    sampler: str = "sde"          # sampler.SAMPLERS
    noise: str = "release"        # sampler.NOISE_STREAMS

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    def with_seed(self, seed) -> "DecodeInputs":
        return replace(self, seed=seed)
