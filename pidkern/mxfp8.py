"""mxfp8 (OCP microscaling fp8) weights and GEMMs: e4m3 codes with one power-of-two (e8m0)
scale per 32 consecutive values along K. See docs/comfy_quant.md.

Quantizing a row block of 32: scale = 2^ceil(log2(amax / 448)) (e8m0 code exponent + 127;
code 0 for an all-zero block), codes = e4m3(value / scale). The tensor is zero-padded to
multiples of 32 in both dimensions first, and the scales are kept in cuBLAS's swizzled
128x4-tile layout (`swizzle`), as ComfyUI's `*_mxfp8` files store them.

The GEMM, y = (x's blocks) @ (W's blocks)^T, runs natively on cards with block-scaled fp8
tensor cores: compute capability 10.0 (B200) and 12.0 (RTX 50): `F.scaled_mm` with
BlockWise1x32 scales, the activations quantized the same way at every call. Elsewhere (the
CPU, Hopper and older) the weight is dequantized to 16 bits once, at load; the Plan says
which. The native call has not run in this repository's tests (no such card, and the CPU
has no block-scaled GEMM); its operands' quantization is tested against comfy-kitchen's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
E4M3_MAX = 448.0
# compute capabilities with block-scaled (MX) fp8 tensor cores
MX_CAPABILITIES = ((10, 0), (12, 0))


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def quantize_blocks(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, exponents): t [M, K] zero-padded to multiples of 32, as e4m3 codes
    [M', K'] and uint8 e8m0 codes [M', K'/32] (one per block of 32 along K; not swizzled)."""
    t = t.detach().float()
    m, k = t.shape
    padded = t.new_zeros(_roundup(m, BLOCK), _roundup(k, BLOCK))
    padded[:m, :k] = t
    blocks = padded.view(padded.shape[0], -1, BLOCK)
    amax = blocks.abs().amax(-1)
    exp = torch.ceil(torch.log2((amax / E4M3_MAX).clamp_min(2.0 ** -127))).to(torch.int32) + 127
    codes = torch.where(amax == 0, torch.zeros_like(exp), exp.clamp(0, 254)).to(torch.uint8)
    scale = torch.where(amax == 0, torch.ones_like(amax), e8m0_to_float(codes))
    data = (blocks / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).view(padded.shape).to(torch.float8_e4m3fn)
    return data, codes


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """e8m0 block scales (uint8 exponent codes, bias 127) as float32; code 0 reads as 0, as
    comfy-kitchen's writer uses it for all-zero blocks."""
    bits = codes.to(torch.int32) << 23
    return torch.where(codes == 0, torch.zeros_like(bits), bits).view(torch.float32)


def unswizzle(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales [rows, cols] from cuBLAS's swizzled layout: [ceil(rows/128)*128,
    ceil(cols/4)*4] stored as 128x4 tiles, each tile's rows interleaved in four runs of 32
    (tile entry (b, a, c) holds row a*32 + b, column c)."""
    rb, cb = -(-rows // 128), -(-cols // 4)
    tiles = scales.reshape(rb, cb, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(rb * 128, cb * 4)[:rows, :cols]


def swizzle(scales: torch.Tensor) -> torch.Tensor:
    """The inverse of `unswizzle` (zero padding), as the fp8 block-scaled GEMMs read scales."""
    rows, cols = scales.shape
    rb, cb = -(-rows // 128), -(-cols // 4)
    padded = scales.new_zeros(rb * 128, cb * 4)
    padded[:rows, :cols] = scales
    return padded.reshape(rb, 4, 32, cb, 4).permute(0, 3, 2, 1, 4).reshape(rb * 128, cb * 4)


def mx_supported(device) -> str | None:
    """None when `device` runs block-scaled fp8 GEMMs, else why not."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"{dev.type} has no block-scaled fp8 GEMM"
    cap = torch.cuda.get_device_capability(dev)
    if cap not in MX_CAPABILITIES:
        return (f"{torch.cuda.get_device_name(dev)} (compute capability {'.'.join(map(str, cap))}) has no "
                f"block-scaled fp8 tensor cores; mxfp8 GEMMs need 10.0 or 12.0")
    return None


@dataclass(eq=False)
class Mxfp8Weight:
    """A weight as an mxfp8 file stores it: e4m3 codes [N', K'] padded to multiples of 32,
    swizzled e8m0 scales, the logical [N, K] and the dtype the GEMM writes."""
    data: torch.Tensor
    scale: torch.Tensor
    shape: tuple
    dtype: torch.dtype

    def nbytes(self) -> int:
        return self.data.numel() + self.scale.numel()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, cols = self.data.shape
        s = e8m0_to_float(unswizzle(self.scale.view(torch.uint8), rows, cols // BLOCK))
        w = (self.data.float().view(rows, -1, BLOCK) * s.unsqueeze(-1)).view(rows, cols)
        return w[: self.shape[0], : self.shape[1]].to(dtype or self.dtype)


def linear(x: torch.Tensor, w: Mxfp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times w^T on block-scaled fp8 tensor cores (compute capability 10.0 /
    12.0): the activations quantized per block of 32 at every call."""
    import torch.nn.functional as F
    from torch.nn.functional import ScalingType, SwizzleType

    why = mx_supported(x.device)
    if why is not None:
        raise RuntimeError(f"mxfp8 GEMM: {why}; the fast path dequantizes mxfp8 weights there")
    lead, k = x.shape[:-1], x.shape[-1]
    u = x.reshape(-1, k)
    codes, exps = quantize_blocks(u)
    block = ScalingType.BlockWise1x32
    y = F.scaled_mm(codes, w.data.t(), swizzle(exps).view(torch.float8_e8m0fnu), block,
                    w.scale.view(torch.float8_e8m0fnu), block, SwizzleType.SWIZZLE_32_4_4,
                    SwizzleType.SWIZZLE_32_4_4, output_dtype=torch.bfloat16)
    y = y[: u.shape[0], : w.shape[0]]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, w.shape[0])
