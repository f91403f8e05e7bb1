"""Cost model of Real-ESRGAN x4 (RRDBNet): random weights, the published layer shapes.

64 features, 23 RRDB blocks; an RRDB is 3 residual dense blocks (5 convs, growth 32,
each conv sees the input and all earlier outputs) with residual scale 0.2; LeakyReLU 0.2;
two nearest-2x + conv upsamplers, conv_hr and conv_last. 512² in -> 2048² out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x):
    return F.leaky_relu(x, 0.2)


class DenseBlock(nn.Module):
    def __init__(self, feat, growth):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(feat + i * growth, growth if i < 4 else feat, 3, padding=1) for i in range(5))

    def forward(self, x):
        feats = [x]
        for conv in self.convs[:4]:
            feats.append(_lrelu(conv(torch.cat(feats, 1))))
        return x + 0.2 * self.convs[4](torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, feat, growth):
        super().__init__()
        self.rdbs = nn.Sequential(*(DenseBlock(feat, growth) for _ in range(3)))

    def forward(self, x):
        return x + 0.2 * self.rdbs(x)


class RRDBNet(nn.Module):
    def __init__(self, feat=64, blocks=23, growth=32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, feat, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(feat, growth) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(feat, feat, 3, padding=1)
        self.conv_up1 = nn.Conv2d(feat, feat, 3, padding=1)
        self.conv_up2 = nn.Conv2d(feat, feat, 3, padding=1)
        self.conv_hr = nn.Conv2d(feat, feat, 3, padding=1)
        self.conv_last = nn.Conv2d(feat, 3, 3, padding=1)

    def forward(self, x):
        f = self.conv_first(x)
        f = f + self.conv_body(self.body(f))
        f = _lrelu(self.conv_up1(F.interpolate(f, scale_factor=2, mode="nearest")))
        f = _lrelu(self.conv_up2(F.interpolate(f, scale_factor=2, mode="nearest")))
        return self.conv_last(_lrelu(self.conv_hr(f)))


def analytic_flops(height: int, width: int, feat=64, blocks=23, growth=32, batch=1) -> float:
    """Conv FLOPs of one x4 upscale of a height x width image (2 per multiply-add, 3x3 kernels)."""
    def conv(cin, cout, pixels):
        return 2 * 9 * cin * cout * pixels
    lo, mid, hi = height * width, 4 * height * width, 16 * height * width
    rdb = sum(conv(feat + i * growth, growth, lo) for i in range(4)) + conv(feat + 4 * growth, feat, lo)
    total = (conv(3, feat, lo) + blocks * 3 * rdb + conv(feat, feat, lo)
             + conv(feat, feat, mid) + 2 * conv(feat, feat, hi) + conv(feat, 3, hi))
    return float(batch * total)


SMOKE = dict(feat=8, blocks=2, growth=4)


def model(smoke: bool = False, **kw) -> RRDBNet:
    return RRDBNet(**{**(SMOKE if smoke else {}), **kw})
