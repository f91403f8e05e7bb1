"""Images in and out: reading what people hand over as they expect it, writing results
without losing them.

Reading (`read_image`): EXIF orientation applied; 16-bit images scaled by 65535 (never
saturated), 32-bit float images taken as [0, 1] (values outside are refused: tone-map
HDR first); palette, 1-bit, gray, CMYK (through its ICC profile when it has one), LAB,
YCbCr and premultiplied modes converted to RGB; an alpha channel returned beside the
colour (never dropped here); an RGB ICC profile returned so the output can carry it.
Pillow itself stores a 16-bit-per-channel RGB PNG at 8 bits per channel: such images
arrive quantised to 8 bits (the scale is right).

Writing (`check_outputs`, `save_images`): every output path is checked (extension,
folder, writability, a format that can hold alpha) before any work, and each file is
written to a temporary name in its folder and renamed into place, so a failure never
leaves a half-written image under the asked-for name.
"""
from __future__ import annotations

import dataclasses
import io
import os
import warnings
from pathlib import Path

import torch

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".bmp": "BMP"}
ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
# Formats refused with a reason rather than "unknown".
REFUSED = {".gif": "GIF holds at most 256 colours, so the decoded image would be quantised; write .png"}
ALPHA_CHOICES = ("keep", "drop")


# -- results to bytes -------------------------------------------------------------------------

def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] on the CPU: round((clamp(x) + 1) * 127.5),
    half to even; the same rule as the fused output stage's uint8 image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a [B, 3, H, W] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    from ._ext import to_uint8 as rule
    return rule(images).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image
    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


def numbered_paths(path, n: int) -> list[Path]:
    """`path` itself for one image, path-0.png, path-1.png... for more."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(n)]


def image_format(path, what: str = "output") -> str:
    """The Pillow format a path's extension asks for; ValueError naming the path otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in REFUSED:
        raise ValueError(f"{what} {str(path)!r}: {REFUSED[suffix]}")
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{what} {str(path)!r}: unknown image extension {suffix or '(none)'!r}; expected one of "
                         f"{', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def _check_quality(quality) -> None:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"quality={quality!r}: expected an int from 1 to 95 (JPEG quality)")


def _writable_folder(folder: Path, what: str, path: Path) -> None:
    """The folder exists and can take a new file, or can be created."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(probe)!r} is a file, so the folder {str(folder)!r} cannot exist")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r}: cannot write in {str(probe)!r} (permission denied)")


def check_outputs(path, n: int = 1, quality: int = 95, alpha: bool = False, what: str = "output",
                  format: str | None = None) -> list[Path]:
    """The paths `n` images will be written to, checked before any work: a known
    extension, a format that holds alpha when `alpha`, a folder that exists or can be
    made, write permission, and no directory in the way. Returns numbered_paths(path, n)."""
    fmt = format or image_format(path, what)
    _check_quality(quality)
    if alpha and fmt not in ALPHA_FORMATS:
        raise ValueError(f"{what} {str(path)!r}: the image has an alpha channel, which {fmt} cannot hold; write "
                         f"{', '.join(s for s, f in IMAGE_FORMATS.items() if f in ALPHA_FORMATS)}, or drop the "
                         f"alpha on purpose (alpha='drop', CLI --alpha drop)")
    outs = numbered_paths(path, n)
    for out in outs:
        if out.is_dir():
            raise ValueError(f"{what} {str(out)!r} is a directory; expected an image file name")
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(f"{what} {str(out)!r}: the file exists and is not writable")
        _writable_folder(out.parent, what, out)
    return outs


def _write(pic, out: Path, fmt: str, quality: int, icc: bytes | None) -> None:
    """Write to a temporary file in the same folder, then rename: the name appears only
    with a whole image behind it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    opts = {}
    if fmt == "JPEG":
        opts["quality"] = quality
        if pic.mode not in ("RGB", "L"):
            raise ValueError(f"output {str(out)!r}: JPEG cannot hold a {pic.mode} image")
    elif fmt == "WEBP":
        opts["lossless"] = True
    icc = icc if icc is not None else pic.info.get("icc_profile")
    if icc and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        opts["icc_profile"] = icc
    try:
        pic.save(tmp, format=fmt, **opts)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def save_images(images, path, quality: int = 95, format: str | None = None, alpha=None,
                icc_profile: bytes | None = None) -> list[Path]:
    """Write images ([B, 3, H, W] in [-1, 1], or a list of PIL images), named as save_png
    names them, in the format of the path's extension (`IMAGE_FORMATS`: PNG, JPEG, WEBP
    lossless, TIFF, BMP); `quality` (1..95) is JPEG's. alpha: per-image alpha planes (PIL
    "L" images of the output size) to attach; icc_profile: an ICC profile to embed (a
    PIL image's own `info["icc_profile"]` is kept otherwise). Every path is checked before
    the first file is written; each file is written whole, then renamed into place."""
    path = Path(path)
    fmt = format or image_format(path)
    pics = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
    alphas = list(alpha) if alpha is not None else [None] * len(pics)
    if len(alphas) != len(pics):
        raise ValueError(f"alpha: {len(alphas)} planes for {len(pics)} images")
    has_alpha = any(a is not None for a in alphas) or any(p.mode in ("RGBA", "LA", "PA") for p in pics)
    outs = check_outputs(path, len(pics), quality, alpha=has_alpha, format=fmt)
    for pic, a, out in zip(pics, alphas, outs):
        if a is not None:
            if a.size != pic.size:
                raise ValueError(f"alpha: a {a.size[0]}x{a.size[1]} plane for a {pic.size[0]}x{pic.size[1]} image")
            pic = pic.convert("RGB")
            pic.putalpha(a)
        _write(pic, out, fmt, quality, icc_profile)
    return outs


def save_png(images: torch.Tensor, path) -> list[Path]:
    """Write one PNG per image: `path` itself for one image, path-0.png, path-1.png... for
    more. `path` must end in .png (`save_images` writes the other formats)."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"path {str(path)!r}: save_png writes PNG files, so the name must end in .png; for "
                         f"{Path(path).suffix or 'other formats'} use pidkern.images.save_images")
    return save_images(images, path, format="PNG")


# -- reading ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageIn:
    """One image as read: `rgb` float32 [1, 3, H, W] in [-1, 1]; `alpha` its alpha plane
    (a PIL "L" image) or None; `icc` the RGB ICC profile to carry to the output, or None."""
    rgb: torch.Tensor
    alpha: object = None
    icc: bytes | None = None


def _profile_space(icc: bytes) -> str | None:
    try:
        from PIL import ImageCms
        return ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip()
    except Exception:   # an unreadable profile is as good as none
        return None


def _unit_array(img, name: str):
    """(array [H, W, C] with C 1 or 3, its full-scale value (255, 65535; 1.0 for float
    data), alpha PIL image or None, icc)."""
    import numpy as np
    from PIL import Image, ImageCms
    icc = img.info.get("icc_profile")
    mode = img.mode
    alpha = None
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    elif mode == "CMYK":
        if icc and _profile_space(icc) == "CMYK":
            # through the file's own profile to sRGB, as a colour-managed viewer shows it
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        else:
            img = img.convert("RGB")
        icc = None
    elif mode == "LAB":
        img = ImageCms.profileToProfile(img, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                        outputMode="RGB")
        icc = None
    elif mode in ("YCbCr", "HSV", "RGBX"):
        img = img.convert("RGB")
    mode = img.mode
    if mode in ("RGBA", "LA"):
        alpha = img.getchannel("A")
        img = img.convert("RGB" if mode == "RGBA" else "L")
        mode = img.mode
    full = 1.0
    if mode in ("RGB", "L"):
        arr, full = np.asarray(img, dtype=np.uint8), 255.0
    elif mode.startswith("I;16"):
        arr, full = np.asarray(img).astype(np.int32), 65535.0
    elif mode == "I":
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{name}: a 32-bit integer image with values {int(a.min())} to {int(a.max())}; only "
                             f"0..65535 (16-bit data) has a known scale. Convert it to 8 or 16 bits first")
        arr, full = a.astype(np.int32), 65535.0
    elif mode == "F":
        a = np.asarray(img).astype(np.float64)
        if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
            raise ValueError(f"{name}: a 32-bit float image with values {a.min():.4g} to {a.max():.4g}; expected "
                             f"[0, 1] (HDR images need tone-mapping first)")
        arr = a.astype(np.float32)
    else:
        raise ValueError(f"{name}: image mode {mode!r} is not supported; save it as RGB, RGBA or gray")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if icc is not None and _profile_space(icc) != "RGB":
        if arr.shape[2] == 1:
            warnings.warn(f"{name}: its {_profile_space(icc) or 'unreadable'} ICC profile is not carried to the RGB "
                          f"output", stacklevel=4)
        icc = None
    return arr, full, alpha, icc


def read_image(img, name: str = "image") -> ImageIn:
    """A path or PIL image -> `ImageIn` (see the module docstring for what is converted)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if isinstance(img, (str, Path)):
        p = Path(img)
        if not p.exists():
            raise FileNotFoundError(f"{name} {str(p)!r} does not exist")
        if p.is_dir():
            raise ValueError(f"{name} {str(p)!r} is a directory; expected an image file")
        try:
            with Image.open(p) as opened:
                opened.load()
                pic = ImageOps.exif_transpose(opened)
                if pic is opened:
                    pic = opened.copy()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{name} {str(p)!r}: cannot read it as an image ({type(e).__name__}: "
                             f"{str(e)[:160]})") from None
        name = f"{name} {str(p)!r}"
    elif isinstance(img, Image.Image):
        pic = ImageOps.exif_transpose(img)
    else:
        raise TypeError(f"{name}: expected a path or a PIL image, got {type(img).__name__}")
    arr, full, alpha, icc = _unit_array(pic, name)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float()
    if t.shape[1] == 1:
        t = t.expand(1, 3, *t.shape[2:])
    # x / (full / 2) - 1: for 8-bit data the float32 rule pidkern has always used
    return ImageIn((t / (full / 2) - 1.0).contiguous(), alpha, icc)


def upscale_alpha(alpha, size: tuple[int, int]):
    """An alpha plane (PIL "L") resized to `size` (width, height) with Lanczos."""
    from PIL import Image
    return alpha.resize(size, Image.Resampling.LANCZOS)
