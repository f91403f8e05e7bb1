"""What a newcomer meets first: bad sizes and flags end in one line (exit 2), never a
traceback; checks run before seconds of loading; progress bars where one waits; a
warning said once."""
import logging
import warnings

import pytest
import torch
from huggingface_hub import constants

import pidkern
from pidkern.api import Decoder, random_net
from pidkern.cli import main
from pidkern.config import RELEASE_DIRS, tiny


def run(args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(rc, err):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pidkern: error: "), err


@pytest.mark.parametrize("args", [["--size", "-64"], ["--size", "0", "--dry-run"], ["--batch", "0", "--dry-run"],
                                  ["--steps", "5", "--dry-run"], ["--reps", "-1", "--dry-run"]])
def test_bench_bad_sizes_exit_2_with_one_line(capsys, args):
    rc, out, err = run(["bench", "--device", "cpu", *args], capsys)
    one_error_line(rc, err)
    assert args[0] in err


def test_bench_writes_a_png_and_counts_small_models(tmp_path, capsys):
    from PIL import Image
    rc, out, err = run(["bench", "--device", "cpu", "--smoke", "-o", tmp_path / "b.png", "--quiet"], capsys)
    assert rc == 0, err
    assert "0.00 B" not in out and "M parameters" in out
    assert Image.open(tmp_path / "b.png").size == (128, 128)


def test_gen_size_needs_backbone(tmp_path, capsys):
    torch.save(torch.randn(16, 2, 2), tmp_path / "lat.pt")
    rc, out, err = run(["decode", tmp_path / "lat.pt", "-o", tmp_path / "x.png", "--preset", "flux-2k",
                        "--gen-size", "64x64"], capsys)
    one_error_line(rc, err)
    assert "--gen-size" in err and "--backbone" in err


def test_info_says_what_runs_here_and_where_weights_come_from(capsys):
    rc, out, err = run(["info"], capsys)
    assert rc == 0, err
    assert "nvidia/PiD" in out
    if not torch.cuda.is_available():
        assert "needs CUDA" not in out and "--backend fast" in out


def test_text_file_checkpoint_is_named_as_text(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("these are my notes\n")
    torch.save(torch.randn(16, 2, 2), tmp_path / "lat.pt")
    rc, out, err = run(["decode", tmp_path / "lat.pt", "-o", tmp_path / "x.png", "--checkpoint",
                        tmp_path / "notes.pth"], capsys)
    one_error_line(rc, err)
    assert "text file" in err and "KeyError" not in err


def test_wrong_latent_fails_before_any_download_or_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.save(torch.randn(5, 2, 2), tmp_path / "lat.pt")
    rc, out, err = run(["decode", tmp_path / "lat.pt", "-o", tmp_path / "x.png", "--checkpoint",
                        RELEASE_DIRS["flux-2k"]], capsys)
    one_error_line(rc, err)
    assert "LATENT" in err and "16" in err and "hf download" not in err


def test_upscale_alpha_into_jpeg_fails_before_loading(tmp_path, capsys):
    from PIL import Image
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "a.png")
    rc, out, err = run(["upscale", tmp_path / "a.png", "-o", tmp_path / "x.jpg", "--vae", tmp_path / "novae",
                        "--checkpoint", tmp_path / "nockpt.safetensors"], capsys)
    one_error_line(rc, err)
    assert "alpha" in err and "--alpha drop" in err


def test_output_folder_blocked_fails_before_loading(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    torch.save(torch.randn(16, 2, 2), tmp_path / "lat.pt")
    rc, out, err = run(["decode", tmp_path / "lat.pt", "-o", tmp_path / "afile" / "x.png", "--checkpoint",
                        tmp_path / "missing.safetensors"], capsys)
    one_error_line(rc, err)
    assert "afile" in err and "missing" not in err


# -- progress and warnings -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dec():
    cfg = tiny("flux-2k")
    return Decoder(random_net(cfg, torch.device("cpu"), torch.float32, seed=1), torch.device("cpu"), torch.float32,
                   "test")


def test_decode_progress_bar(dec, capsys):
    latent = torch.randn(1, 16, 2, 2)
    a = dec.decode(latent, steps=2, seed=0, progress=True)
    err = capsys.readouterr().err
    assert "decode" in err and "2/2" in err
    b = dec.decode(latent, steps=2, seed=0, progress=False)
    assert capsys.readouterr().err == ""
    dec.decode(latent, steps=2, seed=0)             # the reference path counts as long: a bar by default
    assert "2/2" in capsys.readouterr().err
    seen = []
    dec.decode(latent, steps=2, seed=0, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="progress"):
        dec.decode(latent, steps=1, progress="yes")


def test_random_weights_warn_once_and_show_progress(capsys, caplog):
    caplog.set_level(logging.WARNING, logger="pidkern")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        pidkern.load(preset=tiny("flux-2k"), device="cpu")
    assert len([w for w in got if "RANDOM" in str(w.message)]) == 1
    assert not [r for r in caplog.records if "RANDOM" in r.getMessage()]     # not a second time via logging
    assert "building random tiny-flux-2k weights" in capsys.readouterr().err
