"""Cost model of the SD3 / FLUX.1 style VAE (16 latent channels, 8x), decoder and encoder.

Decoder: conv_in, mid block (resnet, single-head self-attention at 512 channels, resnet),
up blocks of 512, 512, 256, 128 channels with `layers` resnets each and a nearest-2x
upsample + conv after the first three, GroupNorm(32, eps 1e-6), SiLU, conv_out to 3.
Encoder: the mirror with 128, 256, 512, 512 channels, stride-2 downsampling convs after the
first three blocks, the same mid block, conv_out to 2 x latent channels (mean, log-var).

`temporal=True` builds the causal 3-D variant of SeedVR2's VAE for one frame: every 3x3
conv becomes a 3x3x3 conv whose time axis is left-padded with two copies of the frame,
so it costs exactly three 2-D convs (three temporal taps), as running that VAE on an image
does. 1x1 convs stay one tap. Random weights: a cost model, not a working VAE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalConv3d(nn.Conv3d):
    """kxkxk conv over [B, C, T, H, W]; time padded on the left by replicating the first frame."""

    def __init__(self, cin, cout, k, stride=1, padding=0):
        super().__init__(cin, cout, k, stride=(1, stride, stride), padding=(0, padding, padding))
        self.time_pad = k - 1

    def forward(self, x):
        if self.time_pad:
            x = torch.cat([x[:, :, :1]] * self.time_pad + [x], dim=2)
        return super().forward(x)


def _conv(temporal, cin, cout, k, stride=1, padding=0):
    if temporal:
        return CausalConv3d(cin, cout, k, stride, padding)
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups, temporal):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = _conv(temporal, cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = _conv(temporal, cout, cout, 3, padding=1)
        self.skip = _conv(temporal, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (head dim = channels)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)

    def forward(self, x):
        shape = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)            # [B, N, C]
        q, k, v = self.qkv(h)[:, None].chunk(3, dim=-1)        # [B, 1, N, C] each
        o = self.proj(F.scaled_dot_product_attention(q, k, v)[:, 0])
        return x + o.transpose(1, 2).reshape(shape)


def _up2(x):
    if x.dim() == 5:  # one frame: upsample space only
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
    return F.interpolate(x, scale_factor=2, mode="nearest")


class Upsample(nn.Module):
    def __init__(self, ch, temporal):
        super().__init__()
        self.conv = _conv(temporal, ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(_up2(x))


class Downsample(nn.Module):
    def __init__(self, ch, temporal):
        super().__init__()
        self.conv = _conv(temporal, ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # SD-style asymmetric pad before a stride-2 conv


class MidBlock(nn.Sequential):
    def __init__(self, ch, groups, temporal):
        super().__init__(ResnetBlock(ch, ch, groups, temporal), AttnBlock(ch, groups),
                         ResnetBlock(ch, ch, groups, temporal))


class VAEDecoder(nn.Module):
    def __init__(self, latent_channels=16, channels=(512, 512, 256, 128), layers=3, groups=32,
                 temporal=False):
        super().__init__()
        self.temporal = temporal
        self.conv_in = _conv(temporal, latent_channels, channels[0], 3, padding=1)
        self.mid = MidBlock(channels[0], groups, temporal)
        blocks, prev = [], channels[0]
        for i, ch in enumerate(channels):
            mods = [ResnetBlock(prev if j == 0 else ch, ch, groups, temporal) for j in range(layers)]
            if i < len(channels) - 1:
                mods.append(Upsample(ch, temporal))
            blocks.append(nn.Sequential(*mods))
            prev = ch
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(groups, prev, eps=1e-6)
        self.conv_out = _conv(temporal, prev, 3, 3, padding=1)

    def forward(self, z):
        if self.temporal and z.dim() == 4:
            z = z[:, :, None]
        h = self.up(self.mid(self.conv_in(z)))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, :, 0] if self.temporal else out


class VAEEncoder(nn.Module):
    def __init__(self, latent_channels=16, channels=(128, 256, 512, 512), layers=2, groups=32,
                 temporal=False):
        super().__init__()
        self.temporal = temporal
        self.conv_in = _conv(temporal, 3, channels[0], 3, padding=1)
        blocks, prev = [], channels[0]
        for i, ch in enumerate(channels):
            mods = [ResnetBlock(prev if j == 0 else ch, ch, groups, temporal) for j in range(layers)]
            if i < len(channels) - 1:
                mods.append(Downsample(ch, temporal))
            blocks.append(nn.Sequential(*mods))
            prev = ch
        self.down = nn.Sequential(*blocks)
        self.mid = MidBlock(prev, groups, temporal)
        self.norm_out = nn.GroupNorm(groups, prev, eps=1e-6)
        self.conv_out = _conv(temporal, prev, 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        if self.temporal and x.dim() == 4:
            x = x[:, :, None]
        h = self.mid(self.down(self.conv_in(x)))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, :, 0] if self.temporal else out


# Widths for the CPU smoke run: same structure, GroupNorm groups that divide the channels.
SMOKE = dict(channels=(32, 32, 16, 8), groups=4)
SMOKE_ENCODER = dict(channels=(8, 16, 32, 32), groups=4)


def decoder(smoke: bool = False, **kw) -> VAEDecoder:
    return VAEDecoder(**{**(SMOKE if smoke else {}), **kw})


def encoder(smoke: bool = False, **kw) -> VAEEncoder:
    return VAEEncoder(**{**(SMOKE_ENCODER if smoke else {}), **kw})
