"""The PiD network in plain, readable PyTorch (docs/design.md, "The network").

This module is the oracle every fused kernel is tested against and the path that runs
wherever there is no GPU. Its parameter names and shapes are those of the released
checkpoints, so `PiDNet(config).load_state_dict(released)` needs no renaming.

The network is split so a decode can run the latent adapter once and the patch/pixel
trunk once per sampler step: `adapter_tokens(latent)` depends only on the latent,
`forward(...)` takes those tokens back through `lq_tokens=`.

`forward(..., shard=)` runs one band of patch rows of a larger image (sequence
parallelism, pidkern.parallel): positions stay global, and every attention attends
across the bands through `shard.attend` (a K/V all-gather or a head all-to-all).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PiDConfig

ROPE_THETA = 10000.0


# ---------------------------------------------------------------------------------------
# Functional pieces: each one is a formula of the network, named so kernels can test against it.

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """The release's rule: statistics in float32, cast back to the input dtype, then times weight."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A gated residual update x + gate * y."""
    return x + gate * y


def timestep_embedding(t1000: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos, sin] of t*1000 at frequencies exp(-ln(10) k / (dim/2)): max period 10."""
    half = dim // 2
    freqs = torch.exp(-math.log(10.0) * torch.arange(half, dtype=torch.float32, device=t1000.device) / half)
    args = t1000.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ntk_theta(grid: int, ref_grid: int, head_dim: int) -> float:
    a = head_dim / 2
    return ROPE_THETA * (grid / ref_grid) ** (a / (a - 2))


def rope_angles_2d(hs: int, ws: int, head_dim: int, ref_grid: int, device=None,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Angles [hs*ws, head_dim/2] in float64 for image tokens in row-major grid order.

    Pair 2k turns by the column position, pair 2k+1 by the row position; positions are
    linspace(0, 16, n), not integers, and theta grows NTK-style with the grid.
    rows (first, count): only the tokens of those grid rows, [count*ws, head_dim/2].
    """
    k = torch.arange(head_dim // 4, dtype=torch.float64, device=device)
    gx = ntk_theta(ws, ref_grid, head_dim) ** (-4 * k / head_dim)
    gy = ntk_theta(hs, ref_grid, head_dim) ** (-4 * k / head_dim)
    px = torch.linspace(0, 16, ws, dtype=torch.float64, device=device)
    py = torch.linspace(0, 16, hs, dtype=torch.float64, device=device)
    if rows is not None:
        py = py[rows[0]:rows[0] + rows[1]]
    ax = (px[None, :, None] * gx).expand(len(py), ws, -1)
    ay = (py[:, None, None] * gy).expand(len(py), ws, -1)
    return torch.stack([ax, ay], dim=-1).reshape(len(py) * ws, head_dim // 2)


def rope_angles_1d(n: int, head_dim: int, device=None) -> torch.Tensor:
    """Angles [n, head_dim/2] in float64 for text positions 0..n-1."""
    k = torch.arange(head_dim // 2, dtype=torch.float64, device=device)
    pos = torch.arange(n, dtype=torch.float64, device=device)
    return pos[:, None] * ROPE_THETA ** (-2 * k / head_dim)


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) in float32: the form every attention implementation consumes."""
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2m, 2m+1) of x [..., N, hd] by table column m, in float32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


# The pieces below take the network's layers as callables (its Linear and RMSNorm modules,
# so hooks and replaced forwards apply; the fused ops' math passes plain functions).

def qk_norm_rope(x: torch.Tensor, norm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE(norm(x)) of queries or keys, in x's dtype (a float32 norm weight must not widen
    half-precision activations)."""
    return apply_rope(norm(x).to(x.dtype), cos, sin)


def lq_gate(x, lq, weight, bias, log_alpha, sigma):
    """x + sigmoid([x, lq] W^T + b - exp(log_alpha) sigma) * lq, sigma per sample.

    The GEMM runs in W's dtype (x may be a float32 residual beside half-precision lq and W);
    the gate and the sum in float32 or wider, as the types promote."""
    logits = F.linear(torch.cat([x.to(weight.dtype), lq.to(weight.dtype)], dim=-1), weight, bias)
    return x + torch.sigmoid(logits - torch.exp(log_alpha) * sigma.float()[:, None, None]) * lq


def silu_mul(g: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product SiLU(g) * up."""
    return F.silu(g) * up


def swiglu_hidden(u: torch.Tensor, w1, w3) -> torch.Tensor:
    """SwiGLU's hidden activation SiLU(w1(u)) * w3(u); w2 follows."""
    return silu_mul(w1(u), w3(u))


def pixel_mlp(u, fc1, fc2):
    """The per-pixel MLP fc2(GELU(fc1(u)))."""
    return fc2(F.gelu(fc1(u)))


def pixel_post(p, e, gate1, shift2, scale2, gate2, norm, mlp):
    """A pixel block after its attention: p1 = p + gate1 * e (rounded to p's dtype), then
    p1 + gate2 * mlp(norm(p1) * (1 + scale2) + shift2), in p's dtype."""
    p1 = residual(p, gate1, e).to(p.dtype)
    return residual(p1, gate2, mlp(modulate(norm(p1), shift2, scale2))).to(p.dtype)


def patch_tokens(x: torch.Tensor, proj, patch: int) -> torch.Tensor:
    """The patch embedding: proj of each P x P patch of x [B, 3, H, W], flattened (c, i, j)."""
    return proj(F.unfold(x, patch, stride=patch).transpose(1, 2))


def pixel_tokens(x: torch.Tensor, proj, sincos: torch.Tensor, patch: int) -> torch.Tensor:
    """Pixel tokens [B*L, P*P, Dp]: proj (3 -> Dp) per pixel plus the sin-cos table [H, W, Dp]."""
    p = proj(x.permute(0, 2, 3, 1))
    return to_patch_pixels(p + sincos.to(p.dtype), patch)


def pixel_sincos(h: int, w: int, dim: int, device=None, first_row: int = 0) -> torch.Tensor:
    """The fixed [h, w, dim] float64 pixel embedding: column half, then row half.
    first_row: the table of pixel rows first_row .. first_row+h-1 of a taller image."""
    quarter = dim // 4
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def half(n, start=0):
        ang = torch.arange(start, start + n, dtype=torch.float64, device=device)[:, None] * freqs
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)

    return join_sincos(half(w), half(h, first_row))


def join_sincos(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The [H, W, dim] pixel table from its halves: col [W, dim/2] (by column), row [H, dim/2]."""
    h, w = row.shape[0], col.shape[0]
    return torch.cat([col[None].expand(h, -1, -1), row[:, None].expand(-1, w, -1)], dim=-1)


def to_patch_pixels(t: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, H, W, C] -> [B*L, P*P, C], pixel i*P+j of patch (hs, ws) at row b*L + hs*Ws + ws."""
    b, h, w, c = t.shape
    t = t.reshape(b, h // patch, patch, w // patch, patch, c).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(-1, patch * patch, c)


def fold_patch_pixels(val: torch.Tensor, batch: int, h: int, w: int, patch: int) -> torch.Tensor:
    """[B*L, P*P, C] -> [B, C, H, W]: out[b, c, P*hs+i, P*ws+j] = val[b*L + hs*Ws+ws, P*i+j, c]."""
    c = val.shape[-1]
    v = val.reshape(batch, h // patch, w // patch, patch, patch, c).permute(0, 5, 1, 3, 2, 4)
    return v.reshape(batch, c, h, w)


def align_latent(latent: torch.Tensor, cfg: PiDConfig, hs: int, ws: int) -> torch.Tensor:
    """Unpack (FLUX.2 v1.5) and bring the latent onto the patch grid."""
    if cfg.unpack > 1:
        u = cfg.unpack
        b, c4, h, w = latent.shape
        # channel c*u*u + a*u + b' goes to row u*r + a, column u*q + b'
        latent = latent.reshape(b, c4 // (u * u), u, u, h, w).permute(0, 1, 4, 2, 5, 3)
        latent = latent.reshape(b, c4 // (u * u), h * u, w * u)
    h, w = latent.shape[-2:]
    if (h, w) == (hs, ws):
        return latent
    if hs > h:
        return F.interpolate(latent, size=(hs, ws), mode="nearest")
    return F.pixel_unshuffle(latent, h // hs)


# ---------------------------------------------------------------------------------------
# Modules, named as in the released state dict.

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, u):
        return self.w2(swiglu_hidden(u, self.w1, self.w3))


class LinearProj(nn.Module):
    """A module holding one Linear called `proj` (the embedders' key layout)."""

    def __init__(self, fan_in: int, fan_out: int, norm: int = 0):
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out)
        if norm:
            self.norm = RMSNorm(norm)

    def forward(self, x):
        y = self.proj(x)
        return self.norm(y) if hasattr(self, "norm") else y


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        self.freq_dim = cfg.time_freq_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden))

    def forward(self, t1000):
        return self.mlp(timestep_embedding(t1000, self.freq_dim).to(self.mlp[0].weight.dtype))


class JointAttention(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        d, hd = cfg.hidden, cfg.head_dim
        self.heads = cfg.heads
        self.qkv_x = nn.Linear(d, 3 * d, bias=False)
        self.qkv_y = nn.Linear(d, 3 * d, bias=False)
        self.q_norm_x, self.k_norm_x = RMSNorm(hd), RMSNorm(hd)
        self.q_norm_y, self.k_norm_y = RMSNorm(hd), RMSNorm(hd)
        self.proj_x = nn.Linear(d, d)
        self.proj_y = nn.Linear(d, d)

    def _heads(self, qkv, q_norm, k_norm, rope):
        b, n, _ = qkv.shape
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
        return qk_norm_rope(q, q_norm, *rope), qk_norm_rope(k, k_norm, *rope), v

    def forward(self, x, y, rope_img, rope_txt, need_text_out: bool = True, attend=None):
        t_len = y.shape[1]
        qx, kx, vx = self._heads(self.qkv_x(x), self.q_norm_x, self.k_norm_x, rope_img)
        qy, ky, vy = self._heads(self.qkv_y(y), self.q_norm_y, self.k_norm_y, rope_txt)
        q, k, v = torch.cat([qy, qx], 2), torch.cat([ky, kx], 2), torch.cat([vy, vx], 2)
        # attend: this process holds a band of image rows, and attends across the bands
        o = F.scaled_dot_product_attention(q, k, v) if attend is None else attend(q, k, v, t_len)
        o = o.transpose(1, 2).flatten(2)
        o_txt = self.proj_y(o[:, :t_len]) if need_text_out else None
        return self.proj_x(o[:, t_len:]), o_txt


class PatchBlock(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        d = cfg.hidden
        self.norm_x1, self.norm_y1 = RMSNorm(d), RMSNorm(d)
        self.attn = JointAttention(cfg)
        self.norm_x2, self.norm_y2 = RMSNorm(d), RMSNorm(d)
        self.mlp_x = SwiGLU(d, cfg.mlp_hidden)
        self.mlp_y = SwiGLU(d, cfg.mlp_hidden)
        self.adaLN_modulation_img = nn.Sequential(nn.Linear(d, 6 * d))
        self.adaLN_modulation_txt = nn.Sequential(nn.Linear(d, 6 * d))

    def forward(self, x, y, c, rope_img, rope_txt, update_text: bool = True, attend=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation_img(c).chunk(6, dim=-1)
        th1, tc1, tg1, th2, tc2, tg2 = self.adaLN_modulation_txt(c).chunk(6, dim=-1)
        ax, ay = self.attn(modulate(self.norm_x1(x), sh1, sc1), modulate(self.norm_y1(y), th1, tc1),
                           rope_img, rope_txt, need_text_out=update_text, attend=attend)
        x = residual(x, g1, ax)
        x = residual(x, g2, self.mlp_x(modulate(self.norm_x2(x), sh2, sc2)))
        if update_text:  # the last block's text stream is never read again
            y = residual(y, tg1, ay)
            y = residual(y, tg2, self.mlp_y(modulate(self.norm_y2(y), th2, tc2)))
        return x, y


class PixelAttention(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        d, hd = cfg.pixel_attn_dim, cfg.pixel_head_dim
        self.heads = cfg.pixel_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)
        self.proj = nn.Linear(d, d)

    def forward(self, a, rope, attend=None):
        b, n, _ = a.shape
        q, k, v = self.qkv(a).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qk_norm_rope(q, self.q_norm, *rope), qk_norm_rope(k, self.k_norm, *rope)
        o = F.scaled_dot_product_attention(q, k, v) if attend is None else attend(q, k, v, 0)
        return self.proj(o.transpose(1, 2).flatten(2))


class PixelMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, u):
        return pixel_mlp(u, self.fc1, self.fc2)


class PixelBlock(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        dp, p2 = cfg.pixel_dim, cfg.pixels_per_patch
        self.norm1 = RMSNorm(dp)
        self.compress_to_attn = nn.Linear(p2 * dp, cfg.pixel_attn_dim)
        self.attn = PixelAttention(cfg)
        self.expand_from_attn = nn.Linear(cfg.pixel_attn_dim, p2 * dp)
        self.norm2 = RMSNorm(dp)
        self.mlp = PixelMLP(dp, cfg.pixel_mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.hidden, 6 * dp * p2))

    def forward(self, p, s, rope, batch: int, attend=None):
        """p [B*L, P2, Dp] pixel tokens, s [B*L, D] the per-patch condition."""
        rows, p2, dp = p.shape
        m = self.adaLN_modulation(s).view(rows, p2, 6 * dp)
        sh1, sc1, g1, sh2, sc2, g2 = m.chunk(6, dim=-1)
        a = self.compress_to_attn(modulate(self.norm1(p), sh1, sc1).reshape(rows, p2 * dp))
        a = self.attn(a.view(batch, rows // batch, -1), rope, attend).reshape(rows, -1)
        return pixel_post(p, self.expand_from_attn(a).view(rows, p2, dp), g1, sh2, sc2, g2, self.norm2, self.mlp)


class FinalLayer(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.pixel_dim)
        self.linear = nn.Linear(cfg.pixel_dim, 3)

    def forward(self, p):
        return self.linear(self.norm(p))


class ResBlock(nn.Module):
    def __init__(self, width: int, groups: int, eps: float, padding_mode: str):
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, width, eps=eps), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, padding_mode=padding_mode),
            nn.GroupNorm(groups, width, eps=eps), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1, padding_mode=padding_mode),
        )

    def forward(self, u):
        return u + self.block(u)


class SigmaGate(nn.Module):
    """The sigma-aware gate: per channel (v1, out=D) or one scalar per token (v1.5, out=1)."""

    def __init__(self, dim: int, per_token: bool):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.content_proj = nn.Linear(2 * dim, 1 if per_token else dim)

    def forward(self, x, lq, sigma):
        return lq_gate(x, lq, self.content_proj.weight, self.content_proj.bias, self.log_alpha, sigma)


class LatentAdapter(nn.Module):
    """lq_proj: latent -> tokens [B, L, Hd] on the patch grid, and the heads that read them."""

    def __init__(self, cfg: PiDConfig):
        super().__init__()
        self.cfg = cfg
        hd, pad = cfg.adapter_width, cfg.adapter_padding
        self.latent_proj = nn.Sequential(
            nn.Conv2d(cfg.adapter_in_channels, hd, 3, padding=1, padding_mode=pad), nn.SiLU(),
            nn.Conv2d(hd, hd, 3, padding=1, padding_mode=pad),
            *[ResBlock(hd, cfg.adapter_groups, cfg.gn_eps, pad) for _ in range(cfg.adapter_res_blocks)],
        )
        self.output_heads = nn.ModuleList(nn.Linear(hd, cfg.hidden) for _ in range(cfg.num_lq_heads))
        self.gate_modules = nn.ModuleList(SigmaGate(cfg.hidden, cfg.is_v15) for _ in range(cfg.num_lq_heads))
        if cfg.is_v15:
            self.pit_head = nn.Linear(hd, cfg.hidden)
            # Trained as an auxiliary RGB target; loaded so checkpoints match, never run.
            self.lq_aux_rgb_head = nn.Sequential(nn.LayerNorm(hd), nn.Linear(hd, hd), nn.SiLU(), nn.Linear(hd, 48))

    def forward(self, latent, hs: int, ws: int):
        z = self.latent_proj(align_latent(latent, self.cfg, hs, ws))
        return z.flatten(2).transpose(1, 2)  # [B, L, Hd], row-major over the grid


class PiDNet(nn.Module):
    def __init__(self, cfg: PiDConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_text, d))
        self.pixel_embedder = LinearProj(3, cfg.pixel_dim)
        self.s_embedder = LinearProj(3 * cfg.pixels_per_patch, d)
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = LinearProj(cfg.text_dim, d, norm=d)
        self.patch_blocks = nn.ModuleList(PatchBlock(cfg) for _ in range(cfg.patch_blocks))
        self.pixel_blocks = nn.ModuleList(PixelBlock(cfg) for _ in range(cfg.pixel_blocks))
        self.final_layer = FinalLayer(cfg)
        self.lq_proj = LatentAdapter(cfg)
        if cfg.is_v15:
            self.pit_lq_gate = SigmaGate(d, per_token=True)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.cfg.patch, w // self.cfg.patch

    def adapter_tokens(self, latent: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The latent adapter's tokens [B, L, Hd]: independent of t and of the image."""
        return self.lq_proj(latent, *self.grid(h, w))

    def rope(self, hs: int, ws: int, text_len: int, device, rows: tuple[int, int] | None = None):
        """(image, text, pixel) RoPE tables of an hs x ws grid; `rows` (first, count): only
        the tokens of those patch rows, at their positions in the whole grid."""
        cfg = self.cfg
        return (rope_tables(rope_angles_2d(hs, ws, cfg.head_dim, cfg.rope_ref_grid, device, rows)),
                rope_tables(rope_angles_1d(text_len, cfg.head_dim, device)),
                rope_tables(rope_angles_2d(hs, ws, cfg.pixel_head_dim, cfg.rope_ref_grid, device, rows)))

    def embed_pixels(self, x: torch.Tensor, row0: int = 0) -> torch.Tensor:
        """Pixel tokens of x; x may be the pixel rows row0.. of a taller image (the sin-cos
        embedding takes each pixel's row in the whole image)."""
        b, _, h, w = x.shape
        return pixel_tokens(x, self.pixel_embedder, pixel_sincos(h, w, self.cfg.pixel_dim, x.device, row0),
                            self.cfg.patch)

    def forward(self, x, t, text, latent, sigma, lq_tokens=None, shard=None):
        """x [B,3,H,W], t [B] in [0,1], text [B,T,2304], latent [B,C,h,w], sigma [B] -> v [B,3,H,W].

        shard: None for the whole image, or the band this process holds of a larger one:
        an object with `row0` (its first patch row), `grid_rows` (the image's patch rows)
        and `attend(q, k, v, core, dim, text)` (the attention output of the band's queries
        (text first) against the whole image, from the band's q, k, v [B, heads, T+rows*Ws,
        hd] and core = SDPA). x is then the band's pixel rows,
        lq_tokens its rows of the adapter tokens (or latent the whole latent), and the
        velocity returned is the band's.
        """
        cfg = self.cfg
        b, _, h, w = x.shape
        hs, ws = self.grid(h, w)
        row0, grid_rows = (0, hs) if shard is None else (shard.row0, shard.grid_rows)
        attend = None if shard is None else (
            lambda q, k, v, text: shard.attend(q, k, v, F.scaled_dot_product_attention, 2, text))
        if lq_tokens is None:
            lq_tokens = self.adapter_tokens(latent, grid_rows * cfg.patch, w)[:, row0 * ws:(row0 + hs) * ws]
        text = text[:, :cfg.max_text]
        rope_img, rope_txt, rope_pix = self.rope(grid_rows, ws, text.shape[1], x.device,
                                                 None if shard is None else (row0, hs))

        temb = self.t_embedder(t * 1000)[:, None]                     # [B, 1, D]
        c = F.silu(temb)
        y = self.y_embedder(text) + self.y_pos_embedding[:, :text.shape[1]]
        xs = patch_tokens(x, self.s_embedder, cfg.patch)
        p = self.embed_pixels(x, row0 * cfg.patch)

        lq = self.lq_proj
        for i, block in enumerate(self.patch_blocks):
            if i % cfg.lq_every == 0:
                j = i // cfg.lq_every
                xs = lq.gate_modules[j](xs, lq.output_heads[j](lq_tokens), sigma)
            xs, y = block(xs, y, c, rope_img, rope_txt, update_text=i < len(self.patch_blocks) - 1,
                          attend=attend)

        s = F.silu(temb + xs)
        if cfg.is_v15:
            s = self.pit_lq_gate(s, lq.pit_head(lq_tokens), sigma)
        s = s.reshape(b * hs * ws, -1)
        for block in self.pixel_blocks:
            p = block(p, s, rope_pix, b, attend)
        return fold_patch_pixels(self.final_layer(p), b, h, w, cfg.patch)
