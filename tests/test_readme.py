"""Every ```python block of README.md runs as written.

The blocks run in one fresh interpreter (each in its own namespace, in a scratch folder),
with HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at a Hugging Face cache that holds tiny
stand-ins in the hub's own layout: a tiny network for every released checkpoint of
nvidia/PiD, a tiny Gemma-2 for Efficient-Large-Model/gemma-2-2b-it and a tiny FLUX.1
pipeline for black-forest-labs/FLUX.1-dev; the folder holds a small photo.png. The
snippets are not edited: what they name is what they get, only smaller."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6} +(.+)$", re.M)


def readme_blocks() -> list[tuple[str, str]]:
    """(id, code) of every python block: the section heading above it and its number."""
    text = README.read_text()
    out = []
    for i, m in enumerate(FENCE.finditer(text)):
        heads = HEADING.findall(text[:m.start()])
        section = heads[-1] if heads else "top"
        out.append((f"{i}-{re.sub(r'[^A-Za-z0-9]+', '-', section).strip('-')[:40]}", m.group(1)))
    return out


BLOCKS = readme_blocks()

RUNNER = r"""
import json, sys, time, traceback
blocks = json.load(open(sys.argv[1]))
results = []
for code in blocks:
    t0 = time.perf_counter()
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
        error = None
    except BaseException:
        error = traceback.format_exc()
    results.append({"error": error, "seconds": time.perf_counter() - t0})
    json.dump(results, open(sys.argv[2], "w"))
"""


def _comfyui_files(work: Path, scratch: Path) -> None:
    """The ComfyUI files the quantized-files block names, in its folder: a tiny v1.5 network
    quantized to int8 with ConvRot by `pidkern convert`, and the tiny Gemma quantized the
    ComfyUI way by comfy-kitchen (tests/test_text_fp8.py's writer, with its tokenizer.json)."""
    pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (the comfy extra) writes the Gemma stand-in")
    from hf_stand_ins import write_release_file
    from pidkern.checkpoint import convert
    from test_text_fp8 import fp8_scaled_file
    src = work / "v15.pth"
    write_release_file(src, "flux-2kto4k-v1.5", seed=7)
    convert(src, scratch / "pid_flux_2kto4k_v1.5_int8_convrot.safetensors", layout="comfyui",
            quantize="int8_tensorwise", convrot=16)
    fp8_scaled_file(scratch / "gemma_2_2b_it_elm_fp8_scaled.safetensors", "comfy_quant")


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from PIL import Image

    from hf_stand_ins import put_folder, put_release
    from pidkern.config import release_names
    from tiny_diffusers import tiny_flux_pipeline
    from tiny_gemma import save_tiny_gemma
    d = tmp_path_factory.mktemp("readme")
    cache, work, scratch = d / "hf" / "hub", d / "build", d / "cwd"
    scratch.mkdir()
    for seed, release in enumerate(release_names()):
        put_release(cache, release, work, seed=seed)
    put_folder(cache, "Efficient-Large-Model/gemma-2-2b-it", save_tiny_gemma(work / "gemma"))
    tiny_flux_pipeline().save_pretrained(work / "flux1")
    put_folder(cache, "black-forest-labs/FLUX.1-dev", work / "flux1")
    _comfyui_files(work, scratch)
    px = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    Image.fromarray(px).save(scratch / "photo.png")
    (d / "blocks.json").write_text(json.dumps([code for _, code in BLOCKS]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRITON_INTERPRET"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(d / "hf"), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    import time
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUNNER, str(d / "blocks.json"), str(d / "results.json")],
                       cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
    results = json.loads((d / "results.json").read_text()) if (d / "results.json").exists() else []
    print(f"README blocks: {time.perf_counter() - t0:.1f} s in all;",
          ", ".join(f"{b[0]} {x['seconds']:.1f} s" for b, x in zip(BLOCKS, results)))
    return {"results": results, "stderr": r.stderr, "cwd": scratch}


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b[0] for b in BLOCKS])
def test_readme_block_runs(ran, index):
    results = ran["results"]
    assert index < len(results), f"the runner stopped before block {index}:\n{ran['stderr'][-3000:]}"
    assert results[index]["error"] is None, f"README block {BLOCKS[index][0]}:\n{BLOCKS[index][1]}\n" \
                                            f"{results[index]['error']}"


def test_readme_blocks_wrote_their_images(ran):
    """What the blocks say they write is there, at the sizes their comments give."""
    from PIL import Image
    cwd = ran["cwd"]
    sizes = {"out.png": (256, 256), "cat.png": (256, 256), "big.png": (96, 64)}
    for name, size in sizes.items():
        if any(name in code for _, code in BLOCKS):
            assert Image.open(cwd / name).size == size, name
