"""Images read as a person expects (16-bit and float scaled, EXIF orientation, palette /
CMYK / gray converted, alpha kept, ICC carried) and written without loss (every path
checked first, whole files renamed into place). References: numpy arithmetic on the
pixel values written, and Pillow's own conversions and Lanczos resize."""
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import pidkern
from pidkern import images
from pidkern.images import check_outputs, read_image, save_images


def gen(seed=0):
    return np.random.default_rng(seed)


def as_ref(arr_unit):
    """[H, W] or [H, W, 3] float64 in [0, 1] -> [1, 3, H, W] float64 in [-1, 1]."""
    a = arr_unit if arr_unit.ndim == 3 else np.repeat(arr_unit[:, :, None], 3, axis=2)
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2 - 1


def test_16bit_gray_png_is_scaled_not_saturated(tmp_path):
    a = gen().integers(0, 65536, (9, 13), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    got = read_image(tmp_path / "g16.png")
    assert got.rgb.shape == (1, 3, 9, 13) and got.alpha is None
    torch.testing.assert_close(got.rgb.double(), as_ref(a / 65535.0), rtol=0, atol=1e-6)
    assert torch.equal(got.rgb[:, 0], got.rgb[:, 1]) and torch.equal(got.rgb[:, 0], got.rgb[:, 2])


def test_float_and_32bit_images(tmp_path):
    f = gen(1).random((5, 7)).astype(np.float32)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    torch.testing.assert_close(read_image(tmp_path / "f.tif").rgb.double(), as_ref(f.astype(np.float64)),
                               rtol=0, atol=1e-6)
    Image.fromarray(f * 4, mode="F").save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError, match="tone-mapping"):
        read_image(tmp_path / "hdr.tif")
    big = Image.fromarray(np.full((4, 4), 1 << 20, dtype=np.int32), mode="I")
    with pytest.raises(ValueError, match="0..65535"):
        read_image(big)


def test_exif_orientation_is_applied(tmp_path):
    a = gen(2).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6                       # "rotate 90 CW to view"
    img.save(tmp_path / "o.png", exif=exif.tobytes())
    got = read_image(tmp_path / "o.png").rgb
    want = np.rot90(a, k=-1)               # what a viewer shows: 90 degrees clockwise
    assert got.shape == (1, 3, 10, 6)
    torch.testing.assert_close(got.double(), as_ref(want / 255.0), rtol=0, atol=1e-6)


def test_palette_gray_cmyk_and_alpha_modes(tmp_path):
    rgb = gen(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    pal = Image.fromarray(rgb).quantize(16)
    want = np.asarray(pal.convert("RGB")) / 255.0        # the palette's own colours
    torch.testing.assert_close(read_image(pal).rgb.double(), as_ref(want), rtol=0, atol=1e-6)
    pal.info["transparency"] = 0
    got = read_image(pal)
    assert got.alpha is not None
    assert np.array_equal(np.asarray(got.alpha), np.asarray(pal.convert("RGBA"))[:, :, 3])
    cmyk = Image.fromarray(rgb).convert("CMYK")
    torch.testing.assert_close(read_image(cmyk).rgb.double(), as_ref(np.asarray(cmyk.convert("RGB")) / 255.0),
                               rtol=0, atol=1e-6)
    la = Image.fromarray(np.stack([rgb[:, :, 0], rgb[:, :, 1]], axis=2), mode="LA")
    got = read_image(la)
    torch.testing.assert_close(got.rgb.double(), as_ref(rgb[:, :, 0] / 255.0), rtol=0, atol=1e-6)
    assert np.array_equal(np.asarray(got.alpha), rgb[:, :, 1])


def test_icc_profile_is_carried(tmp_path):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    a = gen(4).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "icc.png", icc_profile=icc)
    got = read_image(tmp_path / "icc.png")
    assert got.icc == icc
    pic = Image.fromarray(a)
    save_images([pic], tmp_path / "out.png", icc_profile=got.icc)
    assert Image.open(tmp_path / "out.png").info.get("icc_profile") == icc


def test_outputs_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.png").mkdir()
    for path, match in ((tmp_path / "x.gif", "256 colours"), (tmp_path / "x.xyz", "unknown image extension"),
                        (tmp_path / "afile" / "x.png", "is a file"), (tmp_path / "adir.png", "is a directory")):
        with pytest.raises(ValueError, match=match):
            check_outputs(path)
    with pytest.raises(ValueError, match="alpha"):
        check_outputs(tmp_path / "x.jpg", alpha=True)
    assert check_outputs(tmp_path / "new" / "x.png", 2) == [tmp_path / "new" / "x-0.png", tmp_path / "new" / "x-1.png"]
    assert not (tmp_path / "new").exists()          # checked, nothing made
    if os.geteuid() != 0:                           # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(PermissionError):
            check_outputs(ro / "x.png")


@pytest.mark.parametrize("ext", [".png", ".webp", ".tif", ".bmp"])
def test_lossless_formats_round_trip(tmp_path, ext):
    x = torch.rand(1, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out, = save_images(x, tmp_path / f"im{ext}")
    assert torch.equal(torch.from_numpy(np.array(Image.open(out).convert("RGB"))), pidkern.to_uint8(x)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"im{ext}"]      # no temporary left behind


def test_failed_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "keep.bmp"
    out.write_bytes(b"old")
    with pytest.raises(OSError):
        save_images([Image.new("I;16", (4, 4))], out)    # Pillow's BMP writer fails on 16-bit gray
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bmp"]


def test_save_png_insists_on_png(tmp_path):
    x = torch.zeros(1, 3, 2, 2)
    for name in ("x.gif", "x.bmp", "x.jpg"):
        with pytest.raises(ValueError, match="save_png"):
            pidkern.save_png(x, tmp_path / name)
    assert pidkern.save_png(x, tmp_path / "x.png") == [tmp_path / "x.png"]


def test_old_import_paths_still_work():
    from pidkern.api import IMAGE_FORMATS, numbered_paths, save_images as s1, save_png, to_pil, to_uint8  # noqa
    assert s1 is images.save_images and pidkern.to_uint8 is images.to_uint8


# -- through upscale (tiny VAE and decoder) --------------------------------------------------------

@pytest.fixture(scope="module")
def parts():
    pytest.importorskip("diffusers")
    from pidkern.api import Decoder, random_net
    from pidkern.config import tiny
    from tiny_diffusers import tiny_kl_vae
    cfg = tiny("flux-2k")
    dec = Decoder(random_net(cfg, torch.device("cpu"), torch.float32, seed=3), torch.device("cpu"), torch.float32,
                  "test")
    return dec, tiny_kl_vae()


RUN = dict(seed=2, decode_kwargs={"steps": 1, "progress": False})


def test_16bit_gray_upscales_as_the_gray_image(parts, tmp_path):
    import warnings
    dec, vae = parts
    a = gen(5).integers(0, 65536, (8, 12), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # zero captions: said once, not the point here
        got = pidkern.upscale(tmp_path / "g16.png", dec, vae, output_type="pt", **RUN)[0]
        ref = torch.from_numpy(a / 65535.0).float()[None].expand(3, -1, -1)
        want = pidkern.upscale(ref, dec, vae, output_type="pt", **RUN)[0]
        white = pidkern.upscale(torch.ones(3, 8, 12), dec, vae, output_type="pt", **RUN)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, white)


def test_rgba_comes_back_rgba(parts, tmp_path):
    import warnings
    dec, vae = parts
    rgba = gen(6).integers(0, 256, (8, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pic, = pidkern.upscale(tmp_path / "a.png", dec, vae, **RUN)
        rgb_only, = pidkern.upscale(torch.from_numpy(rgba[:, :, :3]).permute(2, 0, 1).contiguous(), dec, vae, **RUN)
        with pytest.raises(ValueError, match="alpha"):
            pidkern.upscale(tmp_path / "a.png", dec, vae, output_type="pt", **RUN)
        dropped, = pidkern.upscale(tmp_path / "a.png", dec, vae, alpha="drop", **RUN)
    assert pic.mode == "RGBA" and pic.size == (48, 32) and dropped.mode == "RGB"
    want_alpha = Image.fromarray(rgba[:, :, 3]).resize((48, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(pic)[:, :, 3], np.asarray(want_alpha))
    assert np.array_equal(np.asarray(pic)[:, :, :3], np.asarray(rgb_only))
