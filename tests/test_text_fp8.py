"""ComfyUI's fp8-scaled Gemma-2 file (gemma_2_2b_it_elm_fp8_scaled-style: e4m3 Linear
weights with per-layer scales) read by CaptionEncoder.from_pretrained: the tiny Gemma
fixture quantized the ComfyUI way by comfy-kitchen, in both of ComfyUI's spellings, encodes
as the same model holding comfy-kitchen's dequantized weights, with the release recipe."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen (the comfy extra) is the reference")

from safetensors.torch import save_file  # noqa: E402

from pidkern import comfy_quant  # noqa: E402
from pidkern.text import CaptionEncoder  # noqa: E402
from tiny_gemma import tiny_gemma, tiny_tokenizer  # noqa: E402


def fp8_scaled_file(path, form):
    model = tiny_gemma(seed=1, head_dim=256)
    sd = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    deq = dict(sd)
    for k, w in list(sd.items()):
        if not (k.endswith(".weight") and w.dim() == 2 and ".layers." in k):
            continue
        layer = k[: -len(".weight")]
        scale = w.abs().amax().float() / 448
        q = ck.quantize_per_tensor_fp8(w, scale, torch.float8_e4m3fn)
        sd[k] = q
        deq[k] = ck.dequantize_per_tensor_fp8(q, scale, torch.float32)
        if form == "scaled_fp8":         # the older form ComfyUI converts on load
            sd[f"{layer}.scale_weight"] = scale
        else:
            sd[f"{layer}.weight_scale"] = scale
            sd[f"{layer}.comfy_quant"] = comfy_quant.marker_tensor({"format": "float8_e4m3fn"})
    if form == "scaled_fp8":
        sd["scaled_fp8"] = torch.empty(2, dtype=torch.float8_e4m3fn)
    save_file(sd, str(path))
    tiny_tokenizer().backend_tokenizer.save(str(path.parent / "tokenizer.json"))
    model.load_state_dict({k[len("model."):]: v for k, v in deq.items()})
    return model


@pytest.mark.parametrize("form", ["scaled_fp8", "comfy_quant"])
def test_fp8_scaled_gemma_file(tmp_path, form):
    path = tmp_path / "gemma_2_2b_it_elm_fp8_scaled.safetensors"
    oracle = fp8_scaled_file(path, form)
    enc = CaptionEncoder.from_pretrained(path, device="cpu", dtype=torch.float32)
    want = CaptionEncoder(oracle, tiny_tokenizer(), device="cpu", dtype=torch.float32)
    caps = ["a cat", ""]
    got, ref = enc.encode(caps), want.encode(caps)
    assert got.shape == (2, 300, 2304)
    assert ((got - ref).norm() / ref.norm()).item() <= 1e-5
    # the fp8 weights really are in the file: the decoder differs from the unquantized one
    plain = CaptionEncoder(tiny_gemma(seed=1, head_dim=256), tiny_tokenizer(), device="cpu", dtype=torch.float32)
    assert (plain.encode(caps) - ref).abs().max() > 1e-4


def test_bad_fp8_gemma_file_names_the_layer(tmp_path):
    path = tmp_path / "gemma_fp8.safetensors"
    fp8_scaled_file(path, "comfy_quant")
    from safetensors.torch import load_file
    sd = load_file(str(path))
    sd.pop("model.layers.0.mlp.down_proj.weight_scale")
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj' \(format 'float8_e4m3fn'\): missing scale"):
        CaptionEncoder.from_pretrained(path, device="cpu", dtype=torch.float32)
