"""FastPiD: the network of pidkern.reference, prepared once for the fast path.

Built from a reference `PiDNet` without changing it: the net's tensors are referenced
read-only where the fast path reads them as they are, and FastPiD owns what it needs in
another layout (`fast_copy_params` in pidkern.memory counts them):

- `w13` of every SwiGLU: w1 and w3 stacked, the one matrix of the fused gate-up GEMM;
- the q and k RMSNorm weights of each patch attention stacked [2, hd], as the QKV GEMM's
  epilogue reads them;
- each pixel block's modulation Linear regrouped by use: (shift1, scale1) rows before
  attention, (gate1, shift2, scale2, gate2) rows after it;
- the conditioning of every time of the sampler's schedules (the time embedding and every
  patch block's adaLN vectors depend on t alone), computed once in float32.

`unread_parameters` names the net's parameters FastPiD never reads after construction
(those it copied or precomputed from, and the last block's text update, which it skips):
the Decoder may park exactly those in host memory while it decodes fast.

With precision="fp8" FastPiD also owns e4m3 copies (pidkern.fp8) of the weights of the
layer groups in `FP8_LAYERS` (its own w13 and pixel_mod among them); the originals of
the net's Linears it quantized join `unread_parameters`. docs/fp8.md says which groups
and why.

`forward` follows `PiDNet.forward` line by line (the comments name the reference line)
and calls only `pidkern.ops`; which implementation each op runs comes from a `Plan`. It
returns the pixel tokens before the final layer: the output stage (`pidkern._ext`) does
the final layer, the fold and the sampler update in one pass. See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fp8, ops
from .plan import CHOICES, PRECISIONS, Plan, race
from .reference import pixel_sincos, timestep_embedding
from .sampler import schedule


@dataclass
class Conditioning:
    """What one time t contributes: temb [1, 1, D] (pre-SiLU) and, per patch block, the
    six adaLN vectors of the image and of the text stream, each [1, 1, D], float32."""
    temb: torch.Tensor
    img: list
    txt: list


def schedule_times() -> list[float]:
    """Every time at which some schedule of sampler.py calls the network."""
    return sorted({t for n in range(1, 5) for t in schedule(n)[:-1]})


# The layer groups an fp8 model may hold in e4m3, and the net's Linears of each ("patch.w13"
# and "pixel.mod" are FastPiD's own copies: w1|w3 of every SwiGLU, the pixel blocks'
# per-pixel modulation). The last patch block's text update never runs: not listed.
FP8_GROUPS = ("patch.qkv", "patch.proj", "patch.w13", "patch.w2",
              "pixel.mod", "pixel.compress", "pixel.qkv", "pixel.proj", "pixel.expand")
# The groups precision="fp8" quantizes, measured by bench/fp8_accuracy.py (docs/fp8.md): the
# patch blocks' GEMMs. The pixel blocks' stay native: closest to the output, their fp8
# error reaches the image least damped (the modulation GEMM alone costs more image error
# than all patch GEMMs together), for 8% of a 2048² decode's FLOPs.
FP8_LAYERS = ("patch.qkv", "patch.proj", "patch.w13", "patch.w2")


def check_fp8_layers(layers) -> tuple[str, ...]:
    if isinstance(layers, str) or not all(g in FP8_GROUPS for g in layers):
        raise ValueError(f"fp8_layers={layers!r}: expected a sequence of {FP8_GROUPS}")
    return tuple(layers)


def fp8_linears(net, layers) -> dict:
    """{module name: nn.Linear} of the net's Linears whose weights the fp8 groups `layers`
    quantize (those meeting fp8.quantizable; the others stay native)."""
    last = len(net.patch_blocks) - 1
    picks = {
        "patch.qkv": lambda i, b: [b.attn.qkv_x, b.attn.qkv_y],
        "patch.proj": lambda i, b: [b.attn.proj_x] + ([b.attn.proj_y] if i < last else []),
        "patch.w2": lambda i, b: [b.mlp_x.w2] + ([b.mlp_y.w2] if i < last else []),
        "pixel.compress": lambda i, b: [b.compress_to_attn],
        "pixel.qkv": lambda i, b: [b.attn.qkv],
        "pixel.proj": lambda i, b: [b.attn.proj],
        "pixel.expand": lambda i, b: [b.expand_from_attn],
    }
    chosen = set()
    for g in check_fp8_layers(layers):
        if g in picks:
            blocks = net.patch_blocks if g.startswith("patch") else net.pixel_blocks
            chosen |= {id(m) for i, b in enumerate(blocks) for m in picks[g](i, b)}
    return {n: m for n, m in net.named_modules() if id(m) in chosen and fp8.quantizable(m.weight)}


def fp8_owned_shapes(cfg, layers) -> list[tuple[int, int]]:
    """Shapes [N, K] of FastPiD's own copies that the fp8 groups `layers` quantize."""
    layers = check_fp8_layers(layers)
    dp, p2 = cfg.pixel_dim, cfg.pixels_per_patch
    shapes = []
    if "patch.w13" in layers:
        shapes += [(2 * cfg.mlp_hidden, cfg.hidden)] * (2 * cfg.patch_blocks)
    if "pixel.mod" in layers:
        shapes += [(2 * dp * p2, cfg.hidden), (4 * dp * p2, cfg.hidden)] * cfg.pixel_blocks
    return [s for s in shapes if s[0] % 16 == 0 and s[1] % 16 == 0]     # fp8.quantizable's rule


def unread_after_build(net, fp8_layers=()) -> tuple[str, ...]:
    """Names (as in `net.named_parameters()`) of the parameters FastPiD reads only while it
    is built: w1/w3 of every SwiGLU and the q/k norms (copied into w13 and qk_norms), the
    time embedder and every adaLN Linear (precomputed into cond, or regrouped into
    pixel_mod), the last patch block's text-update weights (never run: nothing reads
    that block's text stream), and the weights of the Linears an fp8 model quantized
    (`fp8_layers`; their biases stay in use)."""
    last = net.patch_blocks[-1]
    modules = [net.t_embedder, last.attn.proj_y, last.norm_y2, last.mlp_y]
    for b in net.patch_blocks:
        a = b.attn
        modules += [b.mlp_x.w1, b.mlp_x.w3, b.mlp_y.w1, b.mlp_y.w3, a.q_norm_x, a.k_norm_x, a.q_norm_y, a.k_norm_y,
                    b.adaLN_modulation_img, b.adaLN_modulation_txt]
    modules += [b.adaLN_modulation for b in net.pixel_blocks]
    unread = {id(p) for m in modules for p in m.parameters()}
    unread |= {id(m.weight) for m in fp8_linears(net, fp8_layers).values()}
    return tuple(n for n, p in net.named_parameters() if id(p) in unread)


class FastPiD:
    """The fast path's model. `net` is never modified; keep it alive alongside. Of the
    net's parameters, it reads those named in `unread_parameters` only in __init__.

    precision: "native" (the net's dtype) or "fp8": the GEMMs of the groups `fp8_layers`
    (default FP8_LAYERS) in e4m3 with per-row scales (pidkern.fp8), fixed here."""

    def __init__(self, net, dtype: torch.dtype, precision: str = "native", fp8_layers=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        self.net = net
        self.cfg = net.cfg
        self.dtype = dtype
        self.precision = precision
        self.fp8_layers = () if precision == "native" else check_fp8_layers(
            FP8_LAYERS if fp8_layers is None else fp8_layers)
        with torch.no_grad():
            # w1 | w3 per SwiGLU, q | k norms per attention: one tensor each, in FastPiD.
            self.w13 = [(torch.cat([b.mlp_x.w1.weight, b.mlp_x.w3.weight]),
                         torch.cat([b.mlp_y.w1.weight, b.mlp_y.w3.weight])) for b in net.patch_blocks]
            self.qk_norms = [(torch.stack([b.attn.q_norm_x.weight, b.attn.k_norm_x.weight]),
                              torch.stack([b.attn.q_norm_y.weight, b.attn.k_norm_y.weight]))
                             for b in net.patch_blocks]
            self.pixel_mod = [self._split_modulation(b.adaLN_modulation[0]) for b in net.pixel_blocks]
            self.cond = {t: self._conditioning(t) for t in schedule_times()}
            self._fp8 = self._quantize()
        self.unread_parameters = unread_after_build(net, self.fp8_layers)

    def _quantize(self) -> dict:
        """e4m3 copies of the fp8 groups' weights: FastPiD's own w13 / pixel_mod replaced in
        place, and {id(Linear): Fp8Weight} for the net's (read through `_w`)."""
        def q(w):
            return fp8.Fp8Weight.quantize(w) if fp8.quantizable(w) else w
        if "patch.w13" in self.fp8_layers:
            self.w13 = [(q(a), q(b)) for a, b in self.w13]
        if "pixel.mod" in self.fp8_layers:
            self.pixel_mod = [(q(wa), ba, q(wb), bb) for wa, ba, wb, bb in self.pixel_mod]
        return {id(m): fp8.Fp8Weight.quantize(m.weight) for m in fp8_linears(self.net, self.fp8_layers).values()}

    def _w(self, linear):
        """The weight the fast path multiplies by for one of the net's Linears: its fp8 copy
        where the model has one, else the Linear's own."""
        return self._fp8.get(id(linear), linear.weight)

    # -- load-time work ------------------------------------------------------------------
    def _split_modulation(self, lin):
        """(w_pre, b_pre, w_post, b_post): per pixel, (shift1, scale1) rows and then
        (gate1, shift2, scale2, gate2) rows, so each half is one contiguous GEMM. Always
        copies (with one pixel per patch a half is already contiguous, and a view would
        keep the Linear's storage alive when the Decoder parks it)."""
        dp, p2 = self.cfg.pixel_dim, self.cfg.pixels_per_patch
        w = lin.weight.view(p2, 6, dp, -1)
        b = lin.bias.view(p2, 6, dp)
        d = w.shape[-1]

        def own(t, *shape):
            return t.clone(memory_format=torch.contiguous_format).view(*shape)
        return own(w[:, :2], -1, d), own(b[:, :2], -1), own(w[:, 2:], -1, d), own(b[:, 2:], -1)

    def add_times(self, times) -> None:
        """Precompute the conditioning of more times (a DPM-Solver++ schedule's), before a
        graph captures the steps that read it. About 1 MB each for flux-2k; kept."""
        with torch.no_grad():
            for t in times:
                if t not in self.cond:
                    self.cond[t] = self._conditioning(t)

    def _conditioning(self, t: float) -> Conditioning:
        """PiDNet.forward's `temb = t_embedder(t*1000)`, `c = SiLU(temb)` and every block's
        adaLN(c), in float32 for one t."""
        net = self.net
        dev = net.t_embedder.mlp[0].weight.device
        mlp = net.t_embedder.mlp
        e = timestep_embedding(torch.full((1,), t * 1000, device=dev), net.t_embedder.freq_dim)
        h = ops.linear(e, mlp[0].weight.float(), mlp[0].bias.float())
        temb = ops.linear(ops.silu(h), mlp[2].weight.float(), mlp[2].bias.float())
        c = ops.silu(temb)

        def six(seq):
            lin = seq[0]
            return [m.view(1, 1, -1) for m in ops.linear(c, lin.weight.float(), lin.bias.float()).chunk(6, -1)]

        return Conditioning(temb.view(1, 1, -1), [six(b.adaLN_modulation_img) for b in net.patch_blocks],
                            [six(b.adaLN_modulation_txt) for b in net.patch_blocks])

    # -- once per decode -------------------------------------------------------------------
    def tables(self, h: int, w: int, text_len: int, device, shard=None) -> dict:
        """RoPE tables (the reference's own builder) and the pixel sin-cos rows/columns; with
        a `shard` (pidkern.parallel), those of its band of an h x w image."""
        cfg = self.cfg
        hs, ws = h // cfg.patch, w // cfg.patch
        half = cfg.pixel_dim // 2
        rows = None if shard is None else (shard.row0, shard.rows)
        first, n = (0, h) if shard is None else (shard.row0 * cfg.patch, shard.rows * cfg.patch)
        rope_img, rope_txt, rope_pix = self.net.rope(hs, ws, text_len, device, rows)
        return dict(rope_img=rope_img, rope_txt=rope_txt, rope_pix=rope_pix,
                    sincos_col=pixel_sincos(1, w, cfg.pixel_dim, device)[0, :, :half].float().contiguous(),
                    sincos_row=pixel_sincos(n, 1, cfg.pixel_dim, device, first)[:, 0, half:].float().contiguous())

    def prologue(self, latent, text, h: int, w: int, keep_heads: bool, shard=None):
        """The adapter's tokens and heads (independent of t: once per decode) and the text
        stream y (PiDNet.forward: `y = y_embedder(text) + y_pos_embedding`), float32.
        With a `shard`: the heads of its band (the adapter runs whole: its convolutions
        read neighbouring rows)."""
        net = self.net
        tokens = net.adapter_tokens(latent.to(self.dtype), h, w)
        if shard is not None:
            ws = w // self.cfg.patch
            tokens = tokens[:, shard.row0 * ws:(shard.row0 + shard.rows) * ws]
        heads = AdapterHeads(net.lq_proj, tokens, keep=keep_heads)
        ye = net.y_embedder
        y = ops.rms_norm(ops.linear(text.to(self.dtype), ye.proj.weight, ye.proj.bias), ye.norm.weight,
                         ye.norm.eps).float()
        return heads, y + net.y_pos_embedding[:, :text.shape[1]].float()

    # -- the network, one call ---------------------------------------------------------------
    def forward(self, x, t: float, heads, y, sigma, tab, plan: Plan, racing: bool = False, shard=None):
        """The network at time t on the image x [B, 3, H, W]: pixel tokens [B*L, P2, Dp]
        before the final layer. y: the text stream from `prologue`. racing: time the plan's
        open choices here (the warm-up before capture). shard: x is that band of a larger
        image (pidkern.parallel); its attentions gather the other bands' keys and values."""
        if self.precision == "native":
            return self._forward(x, t, heads, y, sigma, tab, plan, racing, shard)
        if plan["gemm"] is None:
            self._race_gemm(plan, racing, x)
        with ops.gemm_route(plan["gemm"]):
            return self._forward(x, t, heads, y, sigma, tab, plan, racing, shard)

    def _race_gemm(self, plan, racing, x):
        """Time the fp8 GEMM routes on the decode's largest fp8 GEMM shape that every model
        has: the image stream's gate-up GEMM (w13) over all patch tokens."""
        if not racing:
            raise RuntimeError("plan entry 'gemm' is still open: run a warm-up with racing=True first")
        w = next((w for w in (self.w13[0][0], *self._fp8.values()) if isinstance(w, fp8.Fp8Weight)), None)
        if w is None:
            plan.set("gemm", "scaled_mm", "rule: no fp8 GEMM in this model")
            return
        rows = x.shape[0] * (x.shape[2] // self.cfg.patch) * (x.shape[3] // self.cfg.patch)
        u = torch.randn(rows, w.shape[1], device=x.device, dtype=self.dtype)

        def run(value):
            with ops.gemm_route(value):
                return ops.linear(u, w)
        race(plan, "gemm", {v: (lambda v=v: run(v)) for v in plan.raced("gemm")}, x.device)

    def _forward(self, x, t, heads, y, sigma, tab, plan, racing, shard):
        net, cfg = self.net, self.cfg
        cond = self.cond[t]                                   # temb, c and adaLN(c): precomputed
        b = x.shape[0]
        xin = x.to(self.dtype)
        se, pe = net.s_embedder.proj, net.pixel_embedder.proj
        # xs = s_embedder(unfold(x)); p = embed_pixels(x)
        xs, p = self._run(plan, "embed", racing, lambda: ops.patch_pixel_embed(
            xin, se.weight, se.bias, pe.weight, pe.bias, tab["sincos_col"], tab["sincos_row"], cfg.patch))
        del xin
        xs = self.patch_blocks(xs.float(), y, heads, sigma, cond, tab, plan, racing, shard)
        s = ops.silu(cond.temb + xs)                          # s = SiLU(temb + xs)
        if cfg.is_v15:                                        # s = pit_lq_gate(s, pit_head(tokens), sigma)
            g = net.pit_lq_gate
            head = heads.head(len(net.lq_proj.output_heads))
            s = self._run(plan, "gate", racing, lambda: ops.lq_gate(s, head, g.content_proj.weight,
                                                                    g.content_proj.bias, g.log_alpha, sigma))
            del head
        s = s.to(self.dtype).reshape(b * xs.shape[1], -1)
        return self.pixel_blocks(p, s, b, tab, plan, racing, shard)  # p = block(p, s, rope_pix, b) for each

    def patch_blocks(self, xs, y, heads, sigma, cond, tab, plan, racing, shard=None):
        """The 14 patch blocks with their adapter gates (PatchBlock.forward).

        Each block's second residual update (x + g2 * mlp) is handed to the next block's
        first norm, which adds it in the same pass (ops.add_rms_modulate with y, gate)."""
        net, cfg = self.net, self.cfg
        n_blocks = len(net.patch_blocks)
        pend_x = pend_y = None
        eps = cfg.rms_eps
        for i, blk in enumerate(net.patch_blocks):
            last = i == n_blocks - 1
            sh1, sc1, g1, sh2, sc2, g2 = cond.img[i]
            th1, tc1, tg1, th2, tc2, tg2 = cond.txt[i]
            if i % cfg.lq_every == 0:                         # xs = gate_j(xs, head_j(tokens), sigma)
                if pend_x is not None:
                    xs = ops.add_scaled(xs, pend_x[1], pend_x[0])
                    pend_x = None
                j = i // cfg.lq_every
                gm = net.lq_proj.gate_modules[j]
                head = heads.head(j)
                xs = self._run(plan, "gate", racing, lambda: ops.lq_gate(
                    xs, head, gm.content_proj.weight, gm.content_proj.bias, gm.log_alpha, sigma))
                del head
            a = blk.attn
            # modulate(norm_x1(x), sh1, sc1); modulate(norm_y1(y), th1, tc1)
            xs, hx = self._kernel(plan, "rms_modulate", lambda: ops.add_rms_modulate(
                xs, blk.norm_x1.weight, sh1, sc1, *(pend_x or (None, None)), eps=eps, out_dtype=self.dtype))
            y, hy = self._kernel(plan, "rms_modulate", lambda: ops.add_rms_modulate(
                y, blk.norm_y1.weight, th1, tc1, *(pend_y or (None, None)), eps=eps, out_dtype=self.dtype))
            pend_x = pend_y = None
            ox, oy = self.patch_attention(i, hx, hy, tab, plan, racing, shard)   # the joint attention
            del hx, hy  # every temporary is dropped as soon as it is read: the peak is the sum
            ax = ops.linear(ox, self._w(a.proj_x), a.proj_x.bias)
            ay = ops.linear(oy, self._w(a.proj_y), a.proj_y.bias) if not last else None
            del ox, oy
            # x = x + g1 * ax; then modulate(norm_x2(x), sh2, sc2)
            xs, hx = self._kernel(plan, "rms_modulate", lambda: ops.add_rms_modulate(
                xs, blk.norm_x2.weight, sh2, sc2, ax, g1, eps=eps, out_dtype=self.dtype))
            del ax
            pend_x = (self.swiglu(plan, "swiglu.image", self.w13[i][0], self._w(blk.mlp_x.w2), hx, racing), g2)
            del hx
            if not last:  # the last block's text stream is never read
                y, hy = self._kernel(plan, "rms_modulate", lambda: ops.add_rms_modulate(
                    y, blk.norm_y2.weight, th2, tc2, ay, tg1, eps=eps, out_dtype=self.dtype))
                pend_y = (self.swiglu(plan, "swiglu.text", self.w13[i][1], self._w(blk.mlp_y.w2), hy, racing), tg2)
                del hy
        return ops.add_scaled(xs, pend_x[1], pend_x[0])    # the last block's x = x + g2 * mlp

    def patch_attention(self, i, hx, hy, tab, plan, racing, shard=None):
        """JointAttention.forward from the block's normalised inputs: (o_img, o_txt) before proj.

        With a shard the bands meet (shard.attend: K/V all-gather or head all-to-all)
        between the QK-norm/RoPE prep and the attention core, so it takes the
        qkv_rope+sdpa route (the fully fused kernels have no such point)."""
        a = self.net.patch_blocks[i].attn
        wx, wy = self._w(a.qkv_x), self._w(a.qkv_y)
        norms_x, norms_y = self.qk_norms[i]
        heads = self.cfg.heads
        if shard is not None:
            q, k, v = ops.qkv_rope(hx, wx, norms_x, tab["rope_img"], hy, wy, norms_y,
                                   tab["rope_txt"], heads=heads)
            o = shard.attend(q, k, v, _attend_core, dim=1, text=hy.shape[1]).flatten(2)
            return o[:, hy.shape[1]:], o[:, :hy.shape[1]]

        def route(backend):
            if backend == "qkv_rope+sdpa":
                q, k, v = ops.qkv_rope(hx, wx, norms_x, tab["rope_img"], hy, wy, norms_y,
                                       tab["rope_txt"], heads=heads)
                return ops.attend(q, k, v, hy.shape[1], True)
            qkv_x, qkv_y = ops.linear(hx, wx), ops.linear(hy, wy)
            return ops.attention(qkv_x, qkv_y, norms_x[0], norms_x[1], norms_y[0], norms_y[1], tab["rope_img"],
                                 tab["rope_txt"], heads, backend=backend)
        return self._route(plan, "attention.patch", racing, route)

    def swiglu(self, plan, name, w13, w2, h, racing):
        """SwiGLU.forward: w2(SiLU(w1 u) * w3 u), the gate-up half as the plan says."""
        shape = h.shape
        u = h.reshape(-1, shape[-1])
        routes = {"triton": lambda: ops.swiglu_gate_up(u, w13), "split": lambda: ops.swiglu_gate_up(u, w13, split=True)}

        def route(value):
            if value == "torch":
                with ops.disabled("swiglu"):
                    return ops.swiglu_gate_up(u, w13)
            return routes[value]()
        return ops.linear(self._route(plan, name, racing, route), w2).view(shape)

    def pixel_blocks(self, p, s, batch, tab, plan, racing, shard=None):
        """PixelBlock.forward for each pixel block, its modulation in bands of patches (the
        plan's band_rows): no more than one band's [rows, 256*96] exists at once."""
        cfg = self.cfg
        rows, p2, dp = p.shape
        band = plan["band_rows"]
        eps = cfg.rms_eps
        for blk, (w_pre, b_pre, w_post, b_post) in zip(self.net.pixel_blocks, self.pixel_mod):
            a = torch.empty(rows, cfg.pixel_attn_dim, device=p.device, dtype=self.dtype)
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                # m = adaLN_modulation(s) (shift1, scale1 only); a = compress(modulate(norm1(p), sh1, sc1))
                m = ops.linear(s[r0:r1], w_pre, b_pre).view(r1 - r0, p2, 2 * dp)
                _, u = self._kernel(plan, "rms_modulate", lambda: ops.add_rms_modulate(
                    p[r0:r1], blk.norm1.weight, m[..., :dp], m[..., dp:], eps=eps, out_dtype=self.dtype))
                a[r0:r1] = ops.linear(u.reshape(r1 - r0, p2 * dp), self._w(blk.compress_to_attn),
                                      blk.compress_to_attn.bias)
            at = blk.attn
            if shard is None:
                qkv = ops.linear(a.view(batch, rows // batch, -1), self._w(at.qkv))
                o = self.pixel_attention(qkv, at, tab, plan, racing)              # a = attn(a, rope)
                del qkv
            else:   # the band's queries against every band's keys and values
                q, k, v = ops.qkv_rope(a.view(batch, rows // batch, -1), self._w(at.qkv),
                                       torch.stack([at.q_norm.weight, at.k_norm.weight]), tab["rope_pix"],
                                       heads=self.cfg.pixel_heads)
                o = shard.attend(q, k, v, _attend_core, dim=1).flatten(2)
                del q, k, v
            a = ops.linear(o, self._w(at.proj), at.proj.bias).view(rows, -1)
            del o
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                # p = p + g1 * expand(a); p = p + g2 * mlp(modulate(norm2(p), sh2, sc2))
                m = ops.linear(s[r0:r1], w_post, b_post)
                e = ops.linear(a[r0:r1], self._w(blk.expand_from_attn), blk.expand_from_attn.bias)
                mlp = blk.mlp
                # a band's new tokens depend on that band alone: update p in place
                p[r0:r1] = self._kernel(plan, "pixel_modulate", lambda: ops.pixel_post(
                    p[r0:r1], e, m, blk.norm2.weight, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                    eps=eps))
                del m, e
        return p

    def pixel_attention(self, qkv, at, tab, plan, racing):
        """PixelAttention.forward from the qkv Linear's output, before proj (no text)."""
        def route(backend):
            return ops.attention(qkv, None, at.q_norm.weight, at.k_norm.weight, None, None, tab["rope_pix"], None,
                                 self.cfg.pixel_heads, backend=backend)[0]
        return self._route(plan, "attention.pixel", racing, route)

    # -- dispatch by the plan ----------------------------------------------------------------
    def _route(self, plan: Plan, name: str, racing: bool, route):
        """route(value) with the plan's value for `name`; an open choice is raced first
        (racing=True, the warm-up before capture) over the plan's candidates for it."""
        if plan[name] is None:
            if not racing:
                raise RuntimeError(f"plan entry {name!r} is still open: run a warm-up with racing=True first")
            race(plan, name, {v: (lambda v=v: route(v)) for v in plan.raced(name)}, self.net.s_embedder.proj.weight.device)
        return route(plan[name])

    def _run(self, plan, name, racing, call):
        """A kernel op raced or set as "triton" or "torch" (its PyTorch math)."""
        op = CHOICES[name][1]

        def route(value):
            if value == "torch":
                with ops.disabled(op):
                    return call()
            return call()
        return self._route(plan, name, racing, route)

    def _kernel(self, plan, name, call):
        """A kernel op decided by rule or override (never raced)."""
        if plan[name] == "torch":
            with ops.disabled(CHOICES[name][1]):
                return call()
        return call()


def _attend_core(q, k, v):
    """ops.attend over [B, N, heads, hd] in that layout: the attention a shard exchanges around."""
    return ops.attend(q, k, v, 0, False)[0].unflatten(-1, (q.shape[2], -1))


class AdapterHeads:
    """The adapter heads' outputs [B, L, D] (j = 0..6, and pit_head last in v1.5).

    Computed once per decode while they take at most 256 MiB (1024² and below; the
    plan's keep_heads). Beyond that (352 MiB at 2048², 1.4 GiB at 4096²) each is
    recomputed from the adapter tokens where it is used: 0.3% more FLOPs, and the decode
    stays within its memory target.
    """

    def __init__(self, lq_proj, tokens, keep: bool):
        self.lins = list(lq_proj.output_heads) + ([lq_proj.pit_head] if hasattr(lq_proj, "pit_head") else [])
        self.tokens = tokens
        self.kept = [self._compute(j) for j in range(len(self.lins))] if keep else None

    def _compute(self, j):
        return ops.linear(self.tokens, self.lins[j].weight, self.lins[j].bias)

    def head(self, j):
        return self.kept[j] if self.kept is not None else self._compute(j)
