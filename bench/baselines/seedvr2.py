"""Cost model of the SeedVR2-3B one-step upscaler: random weights, published layer shapes.

Pipeline on a decoded image: bicubic resize to the target size, the causal 3-D VAE
encoder (SD3-style channels 128/256/512/512, 2 resnets per block, 8x, 16 latent
channels), the 3B DiT once, the causal 3-D VAE decoder (3 resnets per block). The VAE
runs on one frame with every 3x3 conv as 3x3x3 over a left-replicated time axis, so each
costs three 2-D convs (three temporal taps): see vae.py.

DiT: input 16 noise + 16 condition + 1 mask channels, patch 1x2x2 -> Linear(132 -> 2560);
32 blocks of width 2560, 20 heads x 128, QK RMSNorm, RMSNorm pre-norms, SwiGLU MLP hidden
6912 without bias; shared time adaLN (one MLP 256 -> 2560 -> 2560 -> 6x2560, plus per-layer
learned shift/scale/gate); the first 10 blocks have separate text and video weights, the
other 22 share them; 58 text tokens from a 5120-wide embedding; window attention over the
video grid with the text tokens appended to every window (text output averaged over the
windows), alternating plain and half-shifted windows; 3-D RoPE; output RMSNorm +
Linear(2560 -> 64) + unpatchify.

Windows: the token grid is rescaled to the area of a 45x80 reference grid and cut in 3x3
there, i.e. a window is ceil(round(h*s)/3) x ceil(round(w*s)/3) tokens, s = sqrt(3600/(h*w)):
20x20 = 400 video tokens at 2048² (a 128x128 token grid), about 41 windows per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import vae


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 2560
    heads: int = 20
    head_dim: int = 128
    mlp_hidden: int = 6912
    blocks: int = 32
    separate_blocks: int = 10       # blocks with their own text weights
    latent: int = 16
    patch: int = 2
    text_in: int = 5120
    text_tokens: int = 58
    time_freq: int = 256
    window_ref: tuple = (45, 80)
    window_div: int = 3

    @property
    def in_channels(self) -> int:
        return 2 * self.latent + 1


SMOKE = DiTConfig(dim=64, heads=2, head_dim=32, mlp_hidden=96, blocks=2, separate_blocks=1,
                  text_in=40, text_tokens=5, time_freq=32)


def window_size(hg: int, wg: int, cfg: DiTConfig) -> tuple[int, int]:
    s = math.sqrt(cfg.window_ref[0] * cfg.window_ref[1] / (hg * wg))
    return (math.ceil(max(1, round(hg * s)) / cfg.window_div),
            math.ceil(max(1, round(wg * s)) / cfg.window_div))


def _cuts(n: int, size: int, shifted: bool) -> list[tuple[int, int]]:
    starts = set(range(0, n, size))
    if shifted:  # half-shifted windows: the first one is half as tall, the rest move up by half
        starts = {0} | set(range(size // 2, n, size))
    edges = sorted(starts | {n})
    return list(zip(edges[:-1], edges[1:]))


def windows(hg: int, wg: int, cfg: DiTConfig, shifted: bool, device=None) -> list[torch.Tensor]:
    """Token indices of the windows, grouped by window shape: a list of [n_windows, tokens] tensors."""
    wh, ww = window_size(hg, wg, cfg)
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for r0, r1 in _cuts(hg, wh, shifted):
        for c0, c1 in _cuts(wg, ww, shifted):
            idx = (torch.arange(r0, r1)[:, None] * wg + torch.arange(c0, c1)).flatten()
            groups.setdefault((r1 - r0, c1 - c0), []).append(idx)
    return [torch.stack(g).to(device) for g in groups.values()]


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


def rope_tables(pos: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE: pos [N, 3] (t, h, w); the head's pairs are split 1/4 t, 3/8 h, 3/8 w."""
    pairs = head_dim // 2
    split = (pairs - 2 * (3 * pairs // 8), 3 * pairs // 8, 3 * pairs // 8)
    angles = []
    for axis, n in enumerate(split):
        freq = 10000.0 ** (-torch.arange(n, device=pos.device, dtype=torch.float32) / max(n, 1))
        angles.append(pos[:, axis:axis + 1].float() * freq)
    a = torch.cat(angles, -1)
    return a.cos(), a.sin()


def apply_rope(x, cos, sin):
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)


class Stream(nn.Module):
    """The weights of one modality in one block."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.ada = nn.Parameter(torch.zeros(6, d))   # per-layer shift/scale/gate added to the shared time emb
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * cfg.heads * cfg.head_dim)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.heads * cfg.head_dim, d)
        self.w1 = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.w3 = nn.Linear(d, cfg.mlp_hidden, bias=False)
        self.w2 = nn.Linear(cfg.mlp_hidden, d, bias=False)

    def mods(self, emb):
        return (emb + self.ada).unbind(1)  # 6 x [B, d]

    def qkv_heads(self, x, shift, scale, rope):
        h = self.norm1(x) * (1 + scale[:, None]) + shift[:, None]
        b, n, _ = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope), v

    def finish(self, x, o, gate1, shift2, scale2, gate2):
        x = x + gate1[:, None] * self.proj(o.transpose(1, 2).flatten(2))
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + gate2[:, None] * self.w2(F.silu(self.w1(h)) * self.w3(h))


def window_attention(qv, kv, vv, qt, kt, vt, groups):
    """Video tokens attend within their window plus all text tokens; text sees every window (averaged)."""
    b, h, n, d = qv.shape
    t = qt.shape[2]
    out_v = torch.empty_like(qv)
    out_t = torch.zeros(b, h, t, d, device=qt.device, dtype=torch.float32)
    count = 0
    for idx in groups:
        nw, m = idx.shape
        flat = idx.flatten()

        def win(x):
            return x[:, :, flat].view(b, h, nw, m, d).transpose(1, 2).reshape(b * nw, h, m, d)

        def rep(x):
            return x[:, None].expand(b, nw, h, t, d).reshape(b * nw, h, t, d)

        o = F.scaled_dot_product_attention(torch.cat([win(qv), rep(qt)], 2), torch.cat([win(kv), rep(kt)], 2),
                                           torch.cat([win(vv), rep(vt)], 2))
        out_v[:, :, flat] = o[:, :, :m].reshape(b, nw, h, m, d).transpose(1, 2).reshape(b, h, nw * m, d)
        out_t += o[:, :, m:].reshape(b, nw, h, t, d).float().sum(1)
        count += nw
    return out_v, (out_t / count).to(qt.dtype)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, separate_text: bool):
        super().__init__()
        self.vid = Stream(cfg)
        self.txt = Stream(cfg) if separate_text else None

    def forward(self, vid, txt, emb, rope_v, rope_t, groups):
        ts = self.txt or self.vid
        mv, mt = self.vid.mods(emb), ts.mods(emb)
        qv, kv, vv = self.vid.qkv_heads(vid, mv[0], mv[1], rope_v)
        qt, kt, vt = ts.qkv_heads(txt, mt[0], mt[1], rope_t)
        ov, ot = window_attention(qv, kv, vv, qt, kt, vt, groups)
        return self.vid.finish(vid, ov, *mv[2:]), ts.finish(txt, ot, *mt[2:])


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig = DiTConfig()):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.vid_in = nn.Linear(cfg.in_channels * cfg.patch * cfg.patch, d)
        self.txt_in = nn.Linear(cfg.text_in, d)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_freq, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(),
                                      nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg, i < cfg.separate_blocks) for i in range(cfg.blocks))
        self.out_norm = RMSNorm(d)
        self.out = nn.Linear(d, cfg.latent * cfg.patch * cfg.patch)

    def forward(self, x, t, text):
        """x [B, 33, 1, h, w] latent-grid input, t [B] in [0, 1000], text [B, 58, 5120] -> [B, 16, 1, h, w]."""
        cfg, p = self.cfg, self.cfg.patch
        b, c, _, h, w = x.shape
        hg, wg = h // p, w // p
        vid = self.vid_in(x[:, :, 0].reshape(b, c, hg, p, wg, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hg * wg, -1))
        txt = self.txt_in(text)
        k = torch.arange(cfg.time_freq // 2, device=x.device, dtype=torch.float32)
        f = t.float()[:, None] * torch.exp(-math.log(10000) * k / (cfg.time_freq // 2))
        emb = self.time_mlp(torch.cat([f.cos(), f.sin()], -1).to(vid.dtype)).view(b, 6, -1)

        gh, gw = torch.meshgrid(torch.arange(hg, device=x.device), torch.arange(wg, device=x.device), indexing="ij")
        pos_v = torch.stack([torch.zeros_like(gh), gh, gw], -1).view(-1, 3)
        pos_t = torch.arange(txt.shape[1], device=x.device)[:, None].expand(-1, 3)
        rope_v, rope_t = rope_tables(pos_v, cfg.head_dim), rope_tables(pos_t, cfg.head_dim)
        plain, shifted = windows(hg, wg, cfg, False, x.device), windows(hg, wg, cfg, True, x.device)

        for i, block in enumerate(self.blocks):
            vid, txt = block(vid, txt, emb, rope_v, rope_t, shifted if i % 2 else plain)
        out = self.out(self.out_norm(vid)).view(b, hg, wg, cfg.latent, p, p)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, cfg.latent, 1, h, w)


class SeedVR2(nn.Module):
    """Decoded image -> bicubic resize -> VAE encoder -> DiT once -> VAE decoder."""

    def __init__(self, smoke: bool = False):
        super().__init__()
        dit_cfg = SMOKE if smoke else DiTConfig()
        self.encoder = vae.encoder(smoke, latent_channels=dit_cfg.latent, temporal=True)
        self.dit = DiT(dit_cfg)
        self.decoder = vae.decoder(smoke, latent_channels=dit_cfg.latent, temporal=True)

    def forward(self, image, text, size: int):
        x = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False)
        cond = self.encoder(x)[:, :self.dit.cfg.latent]       # the mean half of (mean, log-var)
        noise = torch.randn_like(cond)
        mask = torch.ones_like(cond[:, :1])
        t = torch.full((image.shape[0],), 1000.0, device=image.device)
        v = self.dit(torch.cat([noise, cond, mask], 1)[:, :, None], t, text)[:, :, 0]
        return self.decoder(noise - v)                         # one Euler step from t=1 to 0


def model(smoke: bool = False) -> SeedVR2:
    return SeedVR2(smoke)


def dit_param_count(cfg: DiTConfig = DiTConfig()) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())


__all__ = ["DiTConfig", "SMOKE", "DiT", "SeedVR2", "model", "windows", "window_size"]
