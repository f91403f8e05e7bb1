"""ComfyUI's quantized weight files: finding the quantized layers, checking them, and
dequantizing them exactly. See docs/comfy_quant.md.

ComfyUI marks a quantized Linear in the file itself. Beside `<layer>.weight` (in the
format's storage type) sits `<layer>.comfy_quant`, a uint8 tensor holding UTF-8 JSON such
as `{"format": "int8_tensorwise", "convrot": true, "convrot_groupsize": 256}` (options may
also sit in a nested "params" object), and the format's scale tensors (`<layer>.weight_scale`
and, for some formats, `weight_scale_2`, `input_scale`...). Two other spellings exist: the
safetensors header's `_quantization_metadata` ({"layers": {layer: {"format": ...}}}), and
the older "scaled fp8" files (a `scaled_fp8` entry, `<layer>.scale_weight` and
`<layer>.scale_input`), which ComfyUI reads as float8_e4m3fn with a per-tensor scale.

The formats are those of ComfyUI's `QUANT_ALGOS` (comfy/quant_ops.py), implemented there by
comfy-kitchen. The five pidkern can run (fp8 e4m3 / e5m2 with per-tensor or per-row scales,
mxfp8, nvfp4, int8 with or without the ConvRot Hadamard rotation) are dequantized here in
plain PyTorch; the three 4-bit ones pidkern never runs natively (convrot_w4a4,
asym_w4a8_int8, awq_w4a16) go through comfy-kitchen's own layouts when it is installed
(`pip install "pidkern[comfy]"`). Every one is tested against comfy-kitchen.

A marker that names no format, an unknown format, a missing scale, a scale of the wrong
shape or dtype, or a rotation group that does not divide the layer's width is an error that
names the layer and the format: a quantized file is never guessed at.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping

import torch

from .int8 import Int8Weight
from .mxfp8 import e8m0_to_float, quantize_blocks, swizzle, unswizzle

MARKER = "comfy_quant"                     # <layer>.comfy_quant
METADATA_KEY = "_quantization_metadata"    # the safetensors header's form
LEGACY_FLAG = "scaled_fp8"                 # the older scaled-fp8 files' marker entry
LEGACY_SCALES = {"scale_weight": "weight_scale", "scale_input": "input_scale"}
E8M0 = getattr(torch, "float8_e8m0fnu", None)
# e2m1's sixteen codes (sign bit high), the nvfp4 element type
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class QuantFormatError(ValueError):
    """A quantized layer that cannot be read as its marker says."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One entry of ComfyUI's QUANT_ALGOS, as pidkern reads it.

    storage: dtypes the weight may be stored in; scales: tensors every layer of the format
    carries (suffixes after the layer name); optional: tensors it may carry; block: elements
    per block scale along K (None: per-tensor or per-row scales); packed: two 4-bit codes
    per stored byte; runs_as: what pidkern's fast path runs it as (docs/comfy_quant.md);
    native: dequantized by pidkern itself (else through comfy-kitchen)."""
    name: str
    storage: tuple
    scales: tuple[str, ...]
    optional: tuple[str, ...] = ()
    block: int | None = None
    packed: bool = False
    runs_as: str = "bf16"
    native: bool = True
    layout: str = ""          # comfy-kitchen's layout class


FORMATS = {f.name: f for f in (
    Format("float8_e4m3fn", (torch.float8_e4m3fn,), ("weight_scale",), ("input_scale",), runs_as="fp8",
           layout="TensorCoreFP8E4M3Layout"),
    Format("float8_e5m2", (torch.float8_e5m2,), ("weight_scale",), ("input_scale",), runs_as="bf16",
           layout="TensorCoreFP8E5M2Layout"),
    Format("mxfp8", (torch.float8_e4m3fn,), ("weight_scale",), ("input_scale",), block=32, runs_as="mxfp8",
           layout="TensorCoreMXFP8Layout"),
    Format("nvfp4", (torch.uint8,), ("weight_scale", "weight_scale_2"), ("input_scale", "pre_quant_scale"),
           block=16, packed=True, layout="TensorCoreNVFP4Layout"),
    Format("int8_tensorwise", (torch.int8,), ("weight_scale",), runs_as="int8", layout="TensorWiseINT8Layout"),
    Format("convrot_w4a4", (torch.int8,), ("weight_scale",), packed=True, native=False,
           layout="TensorCoreConvRotW4A4Layout"),
    Format("asym_w4a8_int8", (torch.int8,), ("weight_s_rel",),
           ("weight_s_channel", "weight_codebook", "weight_correction"), packed=True, native=False,
           layout="AsymW4A8Int8Layout"),
    Format("awq_w4a16", (torch.int8, torch.uint8), ("weight_scale", "weight_zeros"), packed=True, native=False,
           layout="TensorCoreAWQW4A16Layout"),
)}
ALL_SUFFIXES = tuple(sorted({s for f in FORMATS.values() for s in f.scales + f.optional} | set(LEGACY_SCALES)))


def _roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def _option(conf: Mapping, key: str, default):
    """A marker option, top level first, then the nested "params" object (ComfyUI's order)."""
    params = conf.get("params")
    params = params if isinstance(params, Mapping) else {}
    return conf.get(key, params.get(key, default))


# ---------------------------------------------------------------------------------------
# One quantized layer.

@dataclasses.dataclass
class QuantLayer:
    """A quantized Linear of a file: its name (the file key without `.weight`), format,
    marker options and the file keys of its weight and scales (role -> key)."""
    name: str
    format: Format
    conf: dict
    keys: dict[str, str]
    source: str = "marker"        # "marker", "metadata" or "scaled_fp8"

    @property
    def convrot(self) -> int | None:
        """The Hadamard group of an int8 ConvRot layer, else None."""
        if self.format.name != "int8_tensorwise" or not _option(self.conf, "convrot", False):
            return None
        return int(_option(self.conf, "convrot_groupsize", 256))

    def describe(self) -> str:
        """The format as `pidkern info` names it."""
        if self.convrot:
            return f"int8_tensorwise+convrot{self.convrot}"
        return self.format.name

    def _err(self, what: str) -> QuantFormatError:
        return QuantFormatError(f"layer {self.name!r} (format {self.format.name!r}): {what}")

    def logical_shape(self, storage: tuple[int, ...], want: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """The weight's [N, K] from its stored shape. Block formats store it padded (mxfp8
        to multiples of 32, nvfp4 of 16) and the padding is not recorded: `want`, the
        network's shape for the key, is taken when it pads to what is stored."""
        if len(storage) != 2:
            return tuple(storage)
        n, k = storage[0], storage[1] * (2 if self.format.packed else 1)
        pad = {"mxfp8": 32, "nvfp4": 16}.get(self.format.name)
        if pad and want is not None and len(want) == 2 and (_roundup(want[0], pad), _roundup(want[1], pad)) == (n, k):
            return tuple(want)
        return n, k

    def check(self, shapes: Mapping[str, tuple], dtypes: Mapping[str, str], logical=None) -> None:
        """Raise QuantFormatError unless the stored tensors fit the format (shapes and
        dtypes from the file's index: nothing is read)."""
        f = self.format
        w = tuple(shapes[self.keys["weight"]])
        if len(w) != 2:
            raise self._err(f"weight {self.keys['weight']!r} has shape {list(w)}; a quantized Linear weight is "
                            f"2-D [N, K]")
        wdt = dtypes[self.keys["weight"]]
        if wdt not in {_name(d) for d in f.storage}:
            raise self._err(f"weight {self.keys['weight']!r} is stored as {wdt}; the format stores "
                            f"{' or '.join(_name(d) for d in f.storage)}")
        n = w[0]
        k = logical[1] if logical is not None else w[1] * (2 if f.packed else 1)

        def scale(role, shapes_ok: list[tuple], dts: tuple, what: str):
            key = self.keys[role]
            s, dt = tuple(shapes[key]), dtypes[key]
            if s not in [tuple(x) for x in shapes_ok]:
                raise self._err(f"scale {key!r} has shape {list(s)}; expected {what}")
            if dt not in {_name(d) for d in dts}:
                raise self._err(f"scale {key!r} is stored as {dt}; expected {' or '.join(_name(d) for d in dts)}")

        if f.name in ("float8_e4m3fn", "float8_e5m2"):
            scale("weight_scale", [(), (1,), (n,), (n, 1)], _FLOATS, f"one value per tensor ([] or [1]) or per row "
                                                                   f"([{n}] or [{n}, 1])")
        elif f.name == "int8_tensorwise":
            scale("weight_scale", [(), (1,), (n,), (n, 1)], _FLOATS, f"one value per tensor ([] or [1]) or per row "
                                                                   f"([{n}] or [{n}, 1])")
            g = self.convrot
            if g is not None:
                if g < 4 or 4 ** round(math.log(g, 4)) != g:
                    raise self._err(f"convrot_groupsize={g}; the rotation is a regular Hadamard matrix, whose size "
                                    f"is a power of 4 (16, 64, 256...)")
                if k % g:
                    raise self._err(f"convrot_groupsize={g} does not divide the layer's input width K={k}; "
                                    f"a ConvRot layer's width must be a multiple of its group")
        elif f.name == "mxfp8":
            if n % 32 or w[1] % 32:
                raise self._err(f"weight shape {list(w)}: mxfp8 stores the weight padded to multiples of 32")
            want = (_roundup(n, 128), _roundup(w[1] // 32, 4))
            scale("weight_scale", [want], (E8M0, torch.uint8),
                  f"{list(want)} (one e8m0 scale per 32 elements in cuBLAS's swizzled block layout)")
        elif f.name == "nvfp4":
            if n % 16 or (2 * w[1]) % 16:
                raise self._err(f"weight shape {list(w)}: nvfp4 stores [N, K/2] packed codes padded to "
                                f"multiples of 16")
            want = (_roundup(n, 128), _roundup(2 * w[1] // 16, 4))
            scale("weight_scale", [want], (torch.float8_e4m3fn, torch.uint8),
                  f"{list(want)} (one e4m3 scale per 16 elements in cuBLAS's swizzled block layout)")
            scale("weight_scale_2", [(), (1,)], _FLOATS, "one per-tensor value")
        if logical is not None and f.name in ("mxfp8", "nvfp4") and (logical[0] > n or logical[1] > k):
            raise self._err(f"logical shape {list(logical)} exceeds the stored {[n, k]}")

    def dequantize(self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...] | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in `dtype`, computed in float32 (exact for the 8-bit formats: one
        rounding of code * scale), cut to `shape` where the format pads."""
        t = {role: tensors[key] for role, key in self.keys.items() if key in tensors}
        w = t["weight"]
        name = self.format.name
        if name == "int8_tensorwise":
            out = Int8Weight.from_stored(w, t["weight_scale"], torch.float32, self.convrot).dequantize()
        elif name in ("float8_e4m3fn", "float8_e5m2"):
            s = t["weight_scale"].float()
            out = w.float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))
        elif name == "mxfp8":
            scales = e8m0_to_float(unswizzle(t["weight_scale"].view(torch.uint8), w.shape[0], w.shape[1] // 32))
            out = (w.float().view(w.shape[0], -1, 32) * scales.unsqueeze(-1)).view(w.shape)
        elif name == "nvfp4":
            lut = torch.tensor(E2M1_VALUES, device=w.device)
            codes = torch.stack([w >> 4, w & 0x0F], dim=-1).view(w.shape[0], -1).long()   # high nibble first
            blocks = unswizzle(t["weight_scale"].view(torch.float8_e4m3fn), w.shape[0], 2 * w.shape[1] // 16)
            total = t["weight_scale_2"].float().reshape(()) * blocks.float()
            out = (lut[codes].view(w.shape[0], -1, 16) * total.unsqueeze(-1)).view(w.shape[0], -1)
        else:
            out = self._kitchen(t, shape)
        if shape is not None and tuple(out.shape) != tuple(shape):
            out = out[: shape[0], : shape[1]]
        return out.to(dtype).contiguous()

    def _kitchen(self, t, shape):
        """The 4-bit formats through comfy-kitchen's own layout classes."""
        try:
            from comfy_kitchen.tensor import get_layout_class
        except ImportError:
            raise self._err('pidkern dequantizes this 4-bit format through comfy-kitchen: pip install '
                            '"pidkern[comfy]"') from None
        cls = get_layout_class(self.format.layout)
        w = t["weight"]
        shape = tuple(shape) if shape is not None else self.logical_shape(tuple(w.shape))
        name = self.format.name
        common = dict(orig_dtype=torch.float32, orig_shape=shape)
        try:
            if name == "convrot_w4a4":
                p = cls.Params(scale=t["weight_scale"], convrot_groupsize=int(_option(self.conf, "convrot_groupsize", 256)),
                               quant_group_size=64, linear_dtype=_option(self.conf, "linear_dtype", "int4"), **common)
            elif name == "asym_w4a8_int8":
                s_rel = t["weight_s_rel"]
                p = cls.Params(scale=s_rel.view(torch.float8_e4m3fn) if s_rel.dtype == torch.uint8 else s_rel,
                               s_channel=t.get("weight_s_channel"), codebook=t.get("weight_codebook"),
                               correction=t.get("weight_correction"),
                               group_size=int(_option(self.conf, "group_size", 16)),
                               convrot_groupsize=int(_option(self.conf, "convrot_groupsize", 256)), **common)
            else:   # awq_w4a16
                p = cls.Params(scale=t["weight_scale"], zeros=t["weight_zeros"],
                               group_size=int(_option(self.conf, "group_size", 64)), **common)
            return cls.dequantize(w, p).float()
        except (ValueError, RuntimeError, TypeError, AssertionError) as e:
            raise self._err(f"comfy-kitchen could not dequantize it ({type(e).__name__}: {e})") from None


def _name(dt) -> str:
    return str(dt).replace("torch.", "")


@dataclasses.dataclass
class StoredWeight:
    """A quantized Linear as its file stores it: the layer, its tensors by role
    ("weight", "weight_scale", ...) and its logical [N, K]."""
    layer: QuantLayer
    tensors: dict[str, torch.Tensor]
    shape: tuple[int, ...]

    @property
    def format(self) -> str:
        return self.layer.format.name

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.layer.dequantize({self.layer.keys[r]: t for r, t in self.tensors.items()}, self.shape, dtype)

    def int8(self, dtype: torch.dtype) -> Int8Weight:
        """An int8_tensorwise layer's codes and scales as they are (no requantisation)."""
        if self.format != "int8_tensorwise":
            raise ValueError(f"layer {self.layer.name!r}: format {self.format!r} is not int8_tensorwise")
        return Int8Weight.from_stored(self.tensors["weight"], self.tensors["weight_scale"], dtype, self.layer.convrot)

    def fp8_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A float8_e4m3fn layer's codes [N, K] and its scale as one float32 per row [N, 1]
        (a per-tensor scale repeated): the operands of a rowwise-scaled fp8 GEMM."""
        if self.format != "float8_e4m3fn":
            raise ValueError(f"layer {self.layer.name!r}: format {self.format!r} is not float8_e4m3fn")
        w = self.tensors["weight"]
        s = self.tensors["weight_scale"].float().reshape(-1, 1)
        return w.contiguous(), s.expand(w.shape[0], 1).contiguous()


# ---------------------------------------------------------------------------------------
# Finding the quantized layers of a file.

def parse_marker(raw, layer: str) -> dict:
    """A `.comfy_quant` marker (uint8 tensor of UTF-8 JSON, bytes or a dict) as a dict with
    a known "format"; QuantFormatError naming `layer` otherwise."""
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QuantFormatError(f"layer {layer!r}: its comfy_quant marker is not UTF-8 JSON ({e})") from None
    if isinstance(raw, str):     # some writers give just the format's name
        raw = {"format": raw}
    if not isinstance(raw, Mapping):
        raise QuantFormatError(f"layer {layer!r}: its comfy_quant marker holds {type(raw).__name__} "
                               f"{raw!r}; expected a JSON object with a \"format\"")
    fmt = raw.get("format")
    if fmt is None:
        raise QuantFormatError(f"layer {layer!r}: its comfy_quant marker {dict(raw)} names no \"format\"; "
                               f"expected one of {sorted(FORMATS)}")
    if fmt not in FORMATS:
        raise QuantFormatError(f"layer {layer!r}: unknown quantization format {fmt!r} in its comfy_quant "
                               f"marker; pidkern reads ComfyUI's {sorted(FORMATS)}")
    return dict(raw)


@dataclasses.dataclass
class QuantIndex:
    """The quantized layers of a file, by their weight's file key, and the file keys that
    only serve them (markers, scales, the scaled_fp8 flag): not network tensors."""
    layers: dict[str, QuantLayer]
    aux: set[str]

    def __bool__(self):
        return bool(self.layers)

    def read_keys(self, weight_keys) -> list[str]:
        """The scale tensors to read beside `weight_keys`."""
        return [k for w in weight_keys if w in self.layers for r, k in self.layers[w].keys.items() if r != "weight"]

    def formats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            out[layer.describe()] = out.get(layer.describe(), 0) + 1
        return out


def scan(keys, dtypes: Mapping[str, str], metadata: Mapping[str, str] | None,
         read: Callable[[list[str]], Mapping[str, torch.Tensor]], where="checkpoint") -> QuantIndex:
    """The QuantIndex of a file from its keys, dtypes and header metadata. Reads only the
    markers (a few bytes each); an empty index for a file without any."""
    keys = list(keys)
    keyset = set(keys)
    confs: dict[str, tuple[dict, str]] = {}
    markers = [k for k in keys if k == MARKER or k.endswith("." + MARKER)]
    if markers:
        for k, raw in read(markers).items():
            layer = k[: -len(MARKER) - 1]
            confs[layer] = (parse_marker(raw, layer), "marker")
    meta = (metadata or {}).get(METADATA_KEY)
    if meta:
        try:
            layers = json.loads(meta).get("layers")
        except (json.JSONDecodeError, AttributeError) as e:
            raise QuantFormatError(f"{where}: unreadable '{METADATA_KEY}' header entry ({e})") from None
        if not isinstance(layers, Mapping):
            raise QuantFormatError(f"{where}: the '{METADATA_KEY}' header entry has no \"layers\" object")
        for layer, conf in layers.items():
            name = _resolve_layer(layer, keyset)
            conf = parse_marker(conf, name)
            if name in confs and confs[name][0] != conf:
                raise QuantFormatError(f"layer {name!r}: its comfy_quant marker {confs[name][0]} and the header's "
                                       f"'{METADATA_KEY}' entry {conf} disagree")
            confs.setdefault(name, (conf, "metadata"))
    aux = set(markers)
    legacy = [k for k in keys if k == LEGACY_FLAG or k.endswith("." + LEGACY_FLAG)]
    if legacy and not meta:
        aux.update(legacy)
        for k in keys:
            if k.endswith(".scale_weight"):
                layer = k[: -len(".scale_weight")]
                confs.setdefault(layer, ({"format": _legacy_format(dtypes[legacy[0]])}, "scaled_fp8"))
    out = {}
    for layer, (conf, source) in confs.items():
        fmt = FORMATS[conf["format"]]
        wkey = f"{layer}.weight"
        if wkey not in keyset:
            raise QuantFormatError(f"layer {layer!r} (format {fmt.name!r}): marked quantized, but the file has no "
                                   f"{wkey!r}")
        roles = {"weight": wkey}
        for role in fmt.scales + fmt.optional:
            for spelling in (role, *[old for old, new in LEGACY_SCALES.items() if new == role]):
                if f"{layer}.{spelling}" in keyset:
                    roles[role] = f"{layer}.{spelling}"
                    break
        lost = [r for r in fmt.scales if r not in roles]
        if lost:
            raise QuantFormatError(f"layer {layer!r} (format {fmt.name!r}): missing scale tensor "
                                   f"{', '.join(repr(f'{layer}.{r}') for r in lost)}; the format stores "
                                   f"{', '.join(fmt.scales)} beside the weight")
        aux.update(v for r, v in roles.items() if r != "weight")
        out[wkey] = QuantLayer(layer, fmt, conf, roles, source)
    # scale-like entries of unmarked layers stay network keys: the strict shape check names them
    return QuantIndex(out, aux)


def _resolve_layer(layer: str, keys: set) -> str:
    """The file's name of a `_quantization_metadata` layer: some writers leave out the
    model prefix the tensors carry."""
    if f"{layer}.weight" in keys:
        return layer
    hits = [k[: -len(".weight")] for k in keys if k.endswith(f".{layer}.weight")]
    return hits[0] if len(hits) == 1 else layer


def _legacy_format(dtype_name: str) -> str:
    # the flag entry's dtype is the storage type (float32 in the oldest files: e4m3)
    return "float8_e5m2" if dtype_name == "float8_e5m2" else "float8_e4m3fn"


# ---------------------------------------------------------------------------------------
# Writing: the formats pidkern runs, quantized the way ComfyUI's files are.

WRITABLE = ("float8_e4m3fn", "int8_tensorwise", "mxfp8")


def marker_tensor(conf: Mapping) -> torch.Tensor:
    return torch.tensor(list(json.dumps(dict(conf)).encode("utf-8")), dtype=torch.uint8)


def quantize_weight(w: torch.Tensor, fmt: str, convrot: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """({suffix: tensor}, marker) of one Linear weight [N, K] in `fmt` (one of WRITABLE):
    float8_e4m3fn with one per-tensor scale; int8_tensorwise with per-row scales, rotated
    by the Hadamard groups of size `convrot` first when given; mxfp8 with e8m0 scales per 32
    (swizzled), padded to multiples of 32. Round to nearest, as comfy-kitchen's writers."""
    if fmt not in WRITABLE:
        raise ValueError(f"fmt={fmt!r}: pidkern writes {WRITABLE}")
    w = w.detach().float()
    n, k = w.shape
    if fmt == "float8_e4m3fn":
        scale = (w.abs().amax() / 448.0).clamp_min(1e-12)
        return {"weight": (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale": scale}, \
            {"format": fmt}
    if fmt == "int8_tensorwise":
        q = Int8Weight.quantize(w, convrot)
        conf = {"format": fmt, **({"convrot": True, "convrot_groupsize": int(convrot)} if convrot else {})}
        return {"weight": q.data, "weight_scale": q.scale}, conf
    data, codes = quantize_blocks(w)
    sw = swizzle(codes)
    return {"weight": data, "weight_scale": sw.view(E8M0) if E8M0 is not None else sw}, {"format": fmt}


def stored_bytes(shape: tuple[int, int], fmt: str | None) -> int:
    """Bytes one Linear weight [N, K] takes stored in `fmt` (None: bfloat16), scales and
    padding included: the resident weight memory of a layer kept in its file's format."""
    n, k = shape
    if fmt is None:
        return 2 * n * k
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        return n * k + 4
    if fmt == "int8_tensorwise":
        return n * k + 4 * n
    if fmt == "mxfp8":
        np_, kp = _roundup(n, 32), _roundup(k, 32)
        return np_ * kp + _roundup(np_, 128) * _roundup(kp // 32, 4)
    if fmt == "nvfp4":
        np_, kp = _roundup(n, 16), _roundup(k, 16)
        return np_ * kp // 2 + _roundup(np_, 128) * _roundup(kp // 16, 4) + 4
    raise ValueError(f"fmt={fmt!r}: expected None (bfloat16) or one of float8_e4m3fn, float8_e5m2, "
                     f"int8_tensorwise, mxfp8, nvfp4")
