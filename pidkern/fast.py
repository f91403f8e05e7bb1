"""FastPiD: the network of pidkern.reference, prepared once for the fast path.

Built from a reference `PiDNet` without changing it. Every Linear the fast path runs is a
prepared layer (pidkern.layers) that owns its format: a view of the net's own weight, a
copy FastPiD laid out itself, or an 8-bit copy. Per patch block (`PatchLayers`) and pixel
block (`PixelLayers`):

- w13 of every SwiGLU: w1 and w3 stacked, the one matrix of the fused gate-up GEMM;
- each pixel block's modulation Linear regrouped by use: (shift1, scale1) rows before
  attention, (gate1, shift2, scale2, gate2) rows after it;
- with precision="fp8", the layers of the groups in `FP8_LAYERS` in e4m3 (docs/fp8.md
  says which groups and why).

Besides them FastPiD owns the q and k RMSNorm weights of each patch attention stacked
[2, hd], as the QKV GEMM's epilogue reads them, and the conditioning of every time of the
sampler's schedules (the time embedding and every patch block's adaLN vectors depend on t
alone), computed once in float32.

`unread_parameters` names the net's parameters FastPiD never reads after construction
(those it copied or precomputed from, those its layers replaced, and the last block's
text update, which it skips): the Decoder may park exactly those while it decodes fast.
`resident_bytes` is what stays on the device (pidkern.memory asks it).

`forward` follows `PiDNet.forward` line by line (the comments name the reference line)
and calls only `pidkern.ops` and its layers; which implementation each op runs comes from
a `Plan`, passed to every call. It returns the pixel tokens before the final layer: the
output stage (`pidkern._ext`) does the final layer, the fold and the sampler update in
one pass. See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fp8, int8, mxfp8, ops
from .layers import Fp8Linear, Int8Linear, Linear, Mxfp8Linear, from_stored, prepare
from .plan import PRECISIONS, Plan, race
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
# The groups precision="int8" quantizes (docs/int8.md): all nine. Per-row int8 with ConvRot
# rounds 3-5x finer than e4m3; with every group in int8 the image error measured below fp8's
# with its patch groups alone, for 37.7% of a 2048² decode's FLOPs against 29.9%.
INT8_LAYERS = FP8_GROUPS


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


def unread_after_build(net) -> tuple[str, ...]:
    """Names (as in `net.named_parameters()`) of the parameters FastPiD reads only while it
    is built, whatever the layers' formats: w1/w3 of every SwiGLU and the q/k norms (copied
    into the w13 layers and qk_norms), the time embedder and every adaLN Linear
    (precomputed into cond, or regrouped into the pixel modulation layers), the last
    patch block's text-update weights (never run: nothing reads that block's text
    stream). A layer that copies a weight adds its own (`Linear.replaces`)."""
    last = net.patch_blocks[-1]
    modules = [net.t_embedder, last.attn.proj_y, last.norm_y2, last.mlp_y]
    for b in net.patch_blocks:
        a = b.attn
        modules += [b.mlp_x.w1, b.mlp_x.w3, b.mlp_y.w1, b.mlp_y.w3, a.q_norm_x, a.k_norm_x, a.q_norm_y, a.k_norm_y,
                    b.adaLN_modulation_img, b.adaLN_modulation_txt]
    modules += [b.adaLN_modulation for b in net.pixel_blocks]
    unread = {id(p) for m in modules for p in m.parameters()}
    return tuple(n for n, p in net.named_parameters() if id(p) in unread)


def _operand(w, dtype):
    """A stored weight as its layer takes it: an int8.Int8Weight, or (e4m3 codes, row scales)."""
    return w.int8(dtype) if w.format == "int8_tensorwise" else w.fp8_rows()


@dataclass
class PatchLayers:
    """The prepared Linears of one patch block (pidkern.layers); the last block has no
    text update (proj_y, w13_y, w2_y None)."""
    qkv_x: Linear
    qkv_y: Linear
    proj_x: Linear
    proj_y: Linear | None
    w13_x: Linear
    w13_y: Linear | None
    w2_x: Linear
    w2_y: Linear | None


@dataclass
class PixelLayers:
    """The prepared Linears of one pixel block: its modulation in two halves (pre: shift1,
    scale1; post: gate1, shift2, scale2, gate2, per pixel), compress, qkv, proj, expand."""
    mod_pre: Linear
    mod_post: Linear
    compress: Linear
    qkv: Linear
    proj: Linear
    expand: Linear


class FastPiD:
    """The fast path's model. `net` is never modified; keep it alive alongside. Of the
    net's parameters, it reads those named in `unread_parameters` only in __init__.

    precision: "native" (the net's dtype), "fp8" or "int8": the Linears of the groups
    `fp8_layers` (default FP8_LAYERS for fp8, INT8_LAYERS for int8) become 8-bit layers
    with per-row scales (layers.Fp8Linear, layers.Int8Linear), fixed here. stored: a
    ComfyUI file's quantized Linears ({network key: comfy_quant.StoredWeight}); those in
    the precision's own format run from their codes and scales, not requantized. Every
    Linear the fast path runs is a prepared layer in `patch` / `pixel`."""

    def __init__(self, net, dtype: torch.dtype, precision: str = "native", fp8_layers=None, stored=None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        self.net = net
        self.cfg = net.cfg
        self.dtype = dtype
        self.precision = precision
        default = {"native": (), "fp8": FP8_LAYERS, "int8": INT8_LAYERS}[precision]
        self.fp8_layers = () if precision == "native" else check_fp8_layers(
            default if fp8_layers is None else fp8_layers)
        # a ComfyUI file's quantized Linears as stored ({network key: comfy_quant.StoredWeight}):
        # those of this precision's format run from their own codes and scales
        self.stored = {k: w for k, w in (stored or {}).items() if w.layer.format.runs_as == precision}
        # an mxfp8 file's Linears run as stored where the card has block-scaled fp8, else
        # from the net's dequantized weights; `mxfp8_note` says which (the plan shows it)
        mx = {k: w for k, w in (stored or {}).items() if w.format == "mxfp8"}
        why = mxfp8.mx_supported(next(net.parameters()).device) if mx else None
        self.stored_mx = mx if why is None else {}
        self.mxfp8_note = None if not mx else (
            f"the file's mxfp8 Linears on block-scaled fp8 GEMMs" if why is None else
            f"the file's mxfp8 Linears dequantized to {str(dtype).replace('torch.', '')} ({why})")
        with torch.no_grad():
            self.qk_norms = [(torch.stack([b.attn.q_norm_x.weight, b.attn.k_norm_x.weight]),
                              torch.stack([b.attn.q_norm_y.weight, b.attn.k_norm_y.weight]))
                             for b in net.patch_blocks]
            self.patch = [self._patch_layers(i, b) for i, b in enumerate(net.patch_blocks)]
            self.pixel = [self._pixel_layers(i, b) for i, b in enumerate(net.pixel_blocks)]
            self.cond = {t: self._conditioning(t) for t in schedule_times()}
        replaced = {n for lin in self.layers() for n in lin.replaces}
        self.unread_parameters = tuple(n for n, _ in net.named_parameters()
                                       if n in replaced or n in set(unread_after_build(net)))

    def _format(self, group: str) -> str:
        return self.precision if group in self.fp8_layers else "native"

    def _linear(self, group: str, module, name: str) -> Linear:
        """A layer for one of the net's Linears (`name` as in net.named_modules)."""
        fmt = self._format(group)
        if fmt != "native" and f"{name}.weight" in self.stored:
            return from_stored(fmt, _operand(self.stored[f"{name}.weight"], self.dtype), self.dtype,
                               module.weight.device, module.bias, replaces=(f"{name}.weight",))
        if fmt == "native" and f"{name}.weight" in self.stored_mx:
            w = self.stored_mx[f"{name}.weight"]
            dev = module.weight.device
            return Mxfp8Linear(mxfp8.Mxfp8Weight(w.tensors["weight"].to(dev), w.tensors["weight_scale"].to(dev),
                                                 w.shape, self.dtype), module.bias, replaces=(f"{name}.weight",))
        return prepare(fmt, module.weight, module.bias, replaces=(f"{name}.weight",))

    def _stored_rows(self, fmt, keys, rows=None):
        """The layer of stored weights `keys` stacked along N (w1 | w3), or of the `rows` of
        one (the regrouped modulation), when every one is stored; else None."""
        if fmt == "native" or not all(k in self.stored for k in keys):
            return None
        ops_ = [_operand(self.stored[k], self.dtype) for k in keys]
        if fmt == "int8":
            w = int8.Int8Weight.cat(ops_)
            return w if rows is None else w.rows(rows)
        codes, scale = torch.cat([c for c, _ in ops_]), torch.cat([s for _, s in ops_])
        return (codes, scale) if rows is None else (codes[rows].contiguous(), scale[rows].contiguous())

    def _patch_layers(self, i, b) -> PatchLayers:
        last = i == len(self.net.patch_blocks) - 1
        n = f"patch_blocks.{i}"

        def w13(mlp, stream):   # w1 | w3 stacked: FastPiD's own, one gate-up GEMM
            fmt = self._format("patch.w13")
            keys = (f"{n}.{stream}.w1.weight", f"{n}.{stream}.w3.weight")
            stored = self._stored_rows(fmt, keys)
            if stored is not None:
                return from_stored(fmt, stored, self.dtype, mlp.w1.weight.device, replaces=keys)
            return prepare(fmt, torch.cat([mlp.w1.weight, mlp.w3.weight]), owned=True, replaces=keys)
        return PatchLayers(
            self._linear("patch.qkv", b.attn.qkv_x, f"{n}.attn.qkv_x"),
            self._linear("patch.qkv", b.attn.qkv_y, f"{n}.attn.qkv_y"),
            self._linear("patch.proj", b.attn.proj_x, f"{n}.attn.proj_x"),
            None if last else self._linear("patch.proj", b.attn.proj_y, f"{n}.attn.proj_y"),
            w13(b.mlp_x, "mlp_x"), None if last else w13(b.mlp_y, "mlp_y"),
            self._linear("patch.w2", b.mlp_x.w2, f"{n}.mlp_x.w2"),
            None if last else self._linear("patch.w2", b.mlp_y.w2, f"{n}.mlp_y.w2"))

    def _pixel_layers(self, i, b) -> PixelLayers:
        n = f"pixel_blocks.{i}"
        w_pre, b_pre, w_post, b_post = self._split_modulation(b.adaLN_modulation[0])
        fmt = self._format("pixel.mod")
        pre, post = self._modulation_rows()
        key = (f"{n}.adaLN_modulation.0.weight",)
        s_pre, s_post = self._stored_rows(fmt, key, pre), self._stored_rows(fmt, key, post)
        dev = w_pre.device
        mod = ((from_stored(fmt, s_pre, self.dtype, dev, b_pre, owned=True),
                from_stored(fmt, s_post, self.dtype, dev, b_post, owned=True)) if s_pre is not None else
               (prepare(fmt, w_pre, b_pre, owned=True), prepare(fmt, w_post, b_post, owned=True)))
        return PixelLayers(*mod,
                           self._linear("pixel.compress", b.compress_to_attn, f"{n}.compress_to_attn"),
                           self._linear("pixel.qkv", b.attn.qkv, f"{n}.attn.qkv"),
                           self._linear("pixel.proj", b.attn.proj, f"{n}.attn.proj"),
                           self._linear("pixel.expand", b.expand_from_attn, f"{n}.expand_from_attn"))

    def layers(self) -> list[Linear]:
        """Every prepared layer (each once)."""
        out = []
        for group in (*self.patch, *self.pixel):
            out += [v for v in vars(group).values() if v is not None]
        return out

    def owned_tensors(self) -> list[torch.Tensor]:
        """The device tensors FastPiD made (its layers' own, the stacked q/k norms); the
        conditioning table (float32, a few vectors per time) is not counted."""
        return [t for lin in self.layers() for t in lin.owned_tensors()] + [t for pair in self.qk_norms for t in pair]

    def resident_bytes(self) -> int:
        """Device bytes of the weights a fast decode holds: the net's parameters less those
        it may park (`unread_parameters`), plus what FastPiD owns."""
        unread = set(self.unread_parameters)
        net = sum(p.numel() * p.element_size() for n, p in self.net.named_parameters() if n not in unread)
        return net + sum(t.numel() * t.element_size() for t in self.owned_tensors())

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

    def _modulation_rows(self):
        """The row indices of `_split_modulation`'s two halves in the modulation weight: a
        stored weight's rows (codes with their per-row scales) regroup the same way, exactly."""
        dp, p2 = self.cfg.pixel_dim, self.cfg.pixels_per_patch
        idx = torch.arange(6 * dp * p2).view(p2, 6, dp)
        return idx[:, :2].reshape(-1), idx[:, 2:].reshape(-1)

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
        if plan["gemm"] is None:
            self._race_gemm(plan, racing, x)
        return self._forward(x, t, heads, y, sigma, tab, plan, racing, shard)

    def _race_gemm(self, plan, racing, x):
        """Time the 8-bit GEMM routes on the decode's largest 8-bit GEMM shape that every
        model has: the image stream's gate-up GEMM (w13) over all patch tokens."""
        if not racing:
            raise RuntimeError("plan entry 'gemm' is still open: run a warm-up with racing=True first")
        kind = Int8Linear if self.precision == "int8" else Fp8Linear
        first = self.patch[0].w13_x
        w = first if isinstance(first, kind) else next((l for l in self.layers() if isinstance(l, kind)), None)
        if w is None:
            rule = "int_mm" if self.precision == "int8" else "scaled_mm"
            plan.set("gemm", rule, f"rule: no {self.precision} GEMM in this model")
            return
        rows = x.shape[0] * (x.shape[2] // self.cfg.patch) * (x.shape[3] // self.cfg.patch)
        u = torch.randn(rows, w.shape[1], device=x.device, dtype=self.dtype)

        race(plan, "gemm", {v: (lambda v=v: w(u, v)) for v in plan.raced("gemm")}, x.device)

    def _forward(self, x, t, heads, y, sigma, tab, plan, racing, shard):
        net, cfg = self.net, self.cfg
        cond = self.cond[t]                                   # temb, c and adaLN(c): precomputed
        b = x.shape[0]
        xin = x.to(self.dtype)
        se, pe = net.s_embedder.proj, net.pixel_embedder.proj
        # xs = s_embedder(unfold(x)); p = embed_pixels(x)
        xs, p = self._route(plan, "embed", racing, lambda r: ops.patch_pixel_embed(
            xin, se.weight, se.bias, pe.weight, pe.bias, tab["sincos_col"], tab["sincos_row"], cfg.patch, route=r))
        del xin
        xs = self.patch_blocks(xs.float(), y, heads, sigma, cond, tab, plan, racing, shard)
        s = ops.silu(cond.temb + xs)                          # s = SiLU(temb + xs)
        if cfg.is_v15:                                        # s = pit_lq_gate(s, pit_head(tokens), sigma)
            g = net.pit_lq_gate
            head = heads.head(len(net.lq_proj.output_heads))
            s = self._route(plan, "gate", racing, lambda r: ops.lq_gate(
                s, head, g.content_proj.weight, g.content_proj.bias, g.log_alpha, sigma, route=r))
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
        gemm, rms = plan["gemm"], plan["rms_modulate"]
        for i, (blk, L) in enumerate(zip(net.patch_blocks, self.patch)):
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
                xs = self._route(plan, "gate", racing, lambda r: ops.lq_gate(
                    xs, head, gm.content_proj.weight, gm.content_proj.bias, gm.log_alpha, sigma, route=r))
                del head
            # modulate(norm_x1(x), sh1, sc1); modulate(norm_y1(y), th1, tc1)
            xs, hx = ops.add_rms_modulate(xs, blk.norm_x1.weight, sh1, sc1, *(pend_x or (None, None)), eps=eps,
                                          out_dtype=self.dtype, route=rms)
            y, hy = ops.add_rms_modulate(y, blk.norm_y1.weight, th1, tc1, *(pend_y or (None, None)), eps=eps,
                                         out_dtype=self.dtype, route=rms)
            pend_x = pend_y = None
            ox, oy = self.patch_attention(i, hx, hy, tab, plan, racing, shard)   # the joint attention
            del hx, hy  # every temporary is dropped as soon as it is read: the peak is the sum
            ax = L.proj_x(ox, gemm)
            ay = L.proj_y(oy, gemm) if not last else None
            del ox, oy
            # x = x + g1 * ax; then modulate(norm_x2(x), sh2, sc2)
            xs, hx = ops.add_rms_modulate(xs, blk.norm_x2.weight, sh2, sc2, ax, g1, eps=eps, out_dtype=self.dtype,
                                          route=rms)
            del ax
            pend_x = (self.swiglu(plan, "swiglu.image", L.w13_x, L.w2_x, hx, racing), g2)
            del hx
            if not last:  # the last block's text stream is never read
                y, hy = ops.add_rms_modulate(y, blk.norm_y2.weight, th2, tc2, ay, tg1, eps=eps, out_dtype=self.dtype,
                                             route=rms)
                pend_y = (self.swiglu(plan, "swiglu.text", L.w13_y, L.w2_y, hy, racing), tg2)
                del hy
        return ops.add_scaled(xs, pend_x[1], pend_x[0])    # the last block's x = x + g2 * mlp

    def patch_attention(self, i, hx, hy, tab, plan, racing, shard=None):
        """JointAttention.forward from the block's normalised inputs: (o_img, o_txt) before proj.

        With a shard the bands meet (shard.attend: K/V all-gather or head all-to-all)
        between the QK-norm/RoPE prep and the attention core, so it takes the
        qkv_rope+sdpa route (the fully fused kernels have no such point)."""
        L, gemm = self.patch[i], plan["gemm"]
        norms_x, norms_y = self.qk_norms[i]
        heads = self.cfg.heads

        def qkv_rope(route=None):   # None: the dispatcher's choice, the kernel on CUDA
            if L.qkv_x.weight16 is None:   # the layers make their own GEMM: the norm and RoPE after it
                return ops.prep_qkv(L.qkv_x(hx, gemm), L.qkv_y(hy, gemm), norms_x[0], norms_x[1], norms_y[0],
                                    norms_y[1], tab["rope_img"], tab["rope_txt"], heads, self.cfg.rms_eps)
            return ops.qkv_rope(hx, L.qkv_x.weight16, norms_x, tab["rope_img"], hy, L.qkv_y.weight16, norms_y,
                                tab["rope_txt"], heads=heads, route=route)
        if shard is not None:
            q, k, v = qkv_rope()
            o = shard.attend(q, k, v, _attend_core, dim=1, text=hy.shape[1]).flatten(2)
            return o[:, hy.shape[1]:], o[:, :hy.shape[1]]

        def route(backend):
            if backend == "qkv_rope+sdpa":
                q, k, v = qkv_rope("triton")
                return ops.attend(q, k, v, hy.shape[1], True)
            qkv_x, qkv_y = L.qkv_x(hx, gemm), L.qkv_y(hy, gemm)
            return ops.attention(qkv_x, qkv_y, norms_x[0], norms_x[1], norms_y[0], norms_y[1], tab["rope_img"],
                                 tab["rope_txt"], heads, backend=backend)
        return self._route(plan, "attention.patch", racing, route)

    def swiglu(self, plan, name, w13, w2, h, racing):
        """SwiGLU.forward: w2(SiLU(w1 u) * w3 u), the gate-up half as the plan says. A w13
        layer without a plain weight (fp8) makes its own GEMM; the plan's route then runs
        SiLU * up (its kernel for "triton" and "split", the PyTorch math for "torch")."""
        shape = h.shape
        u = h.reshape(-1, shape[-1])
        gemm = plan["gemm"]

        def route(value):
            if w13.weight16 is None:
                return ops.silu_mul(w13(u, gemm), "torch" if value == "torch" else "triton")
            if value == "torch":
                return ops.swiglu_gate_up(u, w13.weight16, route="torch")
            return ops.swiglu_gate_up(u, w13.weight16, split=value == "split", route="triton")
        return w2(self._route(plan, name, racing, route), gemm).view(shape)

    def pixel_blocks(self, p, s, batch, tab, plan, racing, shard=None):
        """PixelBlock.forward for each pixel block, its modulation in bands of patches (the
        plan's band_rows): no more than one band's [rows, 256*96] exists at once."""
        cfg = self.cfg
        rows, p2, dp = p.shape
        band = plan["band_rows"]
        eps = cfg.rms_eps
        gemm, rms, post = plan["gemm"], plan["rms_modulate"], plan["pixel_modulate"]
        for blk, L in zip(self.net.pixel_blocks, self.pixel):
            a = torch.empty(rows, cfg.pixel_attn_dim, device=p.device, dtype=self.dtype)
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                # m = adaLN_modulation(s) (shift1, scale1 only); a = compress(modulate(norm1(p), sh1, sc1))
                m = L.mod_pre(s[r0:r1], gemm).view(r1 - r0, p2, 2 * dp)
                _, u = ops.add_rms_modulate(p[r0:r1], blk.norm1.weight, m[..., :dp], m[..., dp:], eps=eps,
                                            out_dtype=self.dtype, route=rms)
                a[r0:r1] = L.compress(u.reshape(r1 - r0, p2 * dp), gemm)
            at = blk.attn
            if shard is None:
                qkv = L.qkv(a.view(batch, rows // batch, -1), gemm)
                o = self.pixel_attention(qkv, at, tab, plan, racing)              # a = attn(a, rope)
                del qkv
            else:   # the band's queries against every band's keys and values
                h = a.view(batch, rows // batch, -1)
                if L.qkv.weight16 is None:
                    q, k, v = ops.prep_qkv(L.qkv(h, gemm), None, at.q_norm.weight, at.k_norm.weight, None, None,
                                           tab["rope_pix"], None, self.cfg.pixel_heads, eps)
                else:
                    q, k, v = ops.qkv_rope(h, L.qkv.weight16, torch.stack([at.q_norm.weight, at.k_norm.weight]),
                                           tab["rope_pix"], heads=self.cfg.pixel_heads)
                o = shard.attend(q, k, v, _attend_core, dim=1).flatten(2)
                del q, k, v
            a = L.proj(o, gemm).view(rows, -1)
            del o
            for r0 in range(0, rows, band):
                r1 = min(rows, r0 + band)
                # p = p + g1 * expand(a); p = p + g2 * mlp(modulate(norm2(p), sh2, sc2))
                m = L.mod_post(s[r0:r1], gemm)
                e = L.expand(a[r0:r1], gemm)
                mlp = blk.mlp
                # a band's new tokens depend on that band alone: update p in place
                p[r0:r1] = ops.pixel_post(p[r0:r1], e, m, blk.norm2.weight, mlp.fc1.weight, mlp.fc1.bias,
                                          mlp.fc2.weight, mlp.fc2.bias, eps=eps, route=post)
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
