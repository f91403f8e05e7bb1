"""The caption encoder against the release's recipe, on a tiny random Gemma-2 (CPU, offline).

The reference below is written from the release's `PixelDiTModel._encode_text_raw`
(pid/_src/models/pixeldit_model.py) and `_CHI_PROMPT` (pid/_src/configs/pid/*/shared_config.py):
prefix = the instruction lines joined by newlines; every caption appended to it;
tokenizer(max_length = len(tokenizer.encode(prefix)) + 300 - 2, padding="max_length",
truncation=True), padding on the right; decoder(ids, mask)[0]; rows [0] + [-299..-1].
"""
import copy
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import pidkern  # noqa: E402
from pidkern import api  # noqa: E402
from pidkern.api import Decoder, random_net  # noqa: E402
from pidkern.config import tiny  # noqa: E402
from pidkern.reference import PiDNet  # noqa: E402
from pidkern.text import CaptionEncoder  # noqa: E402

CPU = torch.device("cpu")

# The release's chi_prompt, line by line (identical in experiment_2k, _2kto4k and _2kto4k_v1pt5).
CHI_PROMPT = [
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]
WORDS = "a cat dog on the mat red blue sky house tree".split()
# A caption of 400 words: well past the 298 tokens the recipe leaves for it.
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(400))
SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}


def _backend():
    """A word-level tokenizer over the prefix's words, with Gemma's special tokens and ids
    and a post-processor that puts BOS first (Gemma's tokenizer adds BOS, no EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    pieces = re.findall(r"\w+|[^\w\s]+", "\n".join(CHI_PROMPT) + " " + " ".join(WORDS))
    vocab = dict(SPECIAL)
    for w in pieces:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def _tokenizer():
    return transformers.PreTrainedTokenizerFast(tokenizer_object=_backend(), bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def gemma():
    """A random 2-layer Gemma-2 causal LM, 2304 wide like 2B (so its rows fit PiD)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=2304, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                    query_pre_attn_scalar=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    lm = transformers.Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():      # RMSNorm weights start at 0 (1-centred): make them count
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return lm


@pytest.fixture
def encoder(gemma):
    return CaptionEncoder(gemma, _tokenizer(), device="cpu", dtype=torch.float32)


@torch.no_grad()
def release_recipe(lm, tokenizer, captions):
    """The release's _encode_text_raw, step by step, on the transformers model directly."""
    chi = "\n".join(CHI_PROMPT)
    n_chi = len(tokenizer.encode(chi))
    tokenizer.padding_side = "right"
    tok = tokenizer([chi + c for c in captions], max_length=n_chi + 300 - 2, padding="max_length",
                    truncation=True, return_tensors="pt")
    hidden = lm.get_decoder()(tok.input_ids, tok.attention_mask)[0]
    select = [0] + list(range(-300 + 1, 0))
    return hidden[:, select], tok


def test_prefix_is_the_releases(encoder):
    assert encoder.prefix == "\n".join(CHI_PROMPT)
    tok = _tokenizer()
    assert encoder.prefix_tokens == len(tok.encode("\n".join(CHI_PROMPT)))
    assert encoder.max_length == encoder.prefix_tokens + 298


def test_matches_release_recipe_batch_of_different_lengths(gemma, encoder):
    caps = ["a cat", "", "a red house on the blue sky with a tree", LONG]
    want, tok = release_recipe(gemma, _tokenizer(), caps)
    assert tok.input_ids.shape[1] > 300          # the selection really drops positions
    assert (tok.input_ids[:, 0] == SPECIAL["<bos>"]).all()
    got = encoder.encode(caps)
    assert got.shape == (4, 300, 2304) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Row 0 is BOS's state: under causal attention it sees only BOS, so it is one row for all.
    torch.testing.assert_close(got[:, 0], got[:1, 0].expand(4, -1), rtol=0, atol=0)
    # Each row is its caption's alone: encoded on its own, uncached, it is the same.
    single = CaptionEncoder(gemma, _tokenizer(), device="cpu", dtype=torch.float32, cache_size=0)
    torch.testing.assert_close(single.encode(caps[2])[0], want[2])

    # The empty caption is the prefix alone through the recipe; ComfyUI's (BOS + padding
    # to 300, no prefix) is something else.
    ids = torch.tensor([[SPECIAL["<bos>"]] + [SPECIAL["<pad>"]] * 299])
    with torch.no_grad():
        comfy = gemma.get_decoder()(ids, (ids != SPECIAL["<pad>"]).long())[0]
    assert (got[1, 1:] - comfy[0, 1:]).abs().max() > 1e-3


def test_long_captions_truncate_on_the_right(encoder):
    # Two captions equal up to well past the cut differ only in words the recipe drops.
    a, b = encoder.encode([LONG + " cat cat", LONG + " dog dog"])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    tok = _tokenizer()
    ids = tok(encoder.prefix + LONG, max_length=encoder.max_length, truncation=True)["input_ids"]
    assert len(ids) == encoder.max_length and ids[0] == SPECIAL["<bos>"]


def test_bfloat16_and_cache(gemma):
    """The release loads Gemma in bfloat16; the encoder casts a float32 model the same way."""
    enc = CaptionEncoder(copy.deepcopy(gemma), _tokenizer(), device="cpu", dtype=torch.bfloat16, cache_size=2)
    first = enc.encode(["a cat", "a dog"])
    assert first.dtype == torch.bfloat16 and first.shape == (2, 300, 2304)
    want, _ = release_recipe(copy.deepcopy(gemma).to(torch.bfloat16), _tokenizer(), ["a cat", "a dog"])
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    calls = []
    handle = enc.model.register_forward_hook(lambda *a: calls.append(1))
    again = enc.encode(["a dog", "a cat", "a cat"])           # all hits: Gemma does not run
    assert calls == []
    torch.testing.assert_close(again, first[[1, 0, 0]], rtol=0, atol=0)
    enc.encode("a tree")                       # evicts "a dog", the least recently used
    assert calls == [1] and set(enc._cache) == {"a cat", "a tree"}
    handle.remove()


def test_offload_moves_the_model(gemma, monkeypatch):
    enc = CaptionEncoder(copy.deepcopy(gemma), _tokenizer(), device="cpu", dtype=torch.float32, offload=True)
    # On a CPU-only machine, pretend the target is another device and watch the moves.
    moves = []
    enc.device = torch.device("meta")
    real_to = enc.model.to

    def spy(*args, **kwargs):
        moves.append(torch.device(args[0]) if args else kwargs.get("device"))
        return enc.model

    monkeypatch.setattr(enc.model, "to", spy)
    monkeypatch.setattr(enc, "_encode", lambda caps: torch.zeros(len(caps), 300, 2304))
    enc.encode("a cat")
    assert moves == [torch.device("meta"), torch.device("cpu")]
    enc.encode("a cat")                                       # a cache hit moves nothing
    assert len(moves) == 2
    monkeypatch.setattr(enc.model, "to", real_to)
    assert next(enc.model.parameters()).device.type == "cpu"


def test_from_pretrained_hf_dir_and_comfy_file(gemma, encoder, tmp_path):
    from safetensors.torch import save_file
    caps = ["a cat"]
    want = encoder.encode(caps)
    hf = tmp_path / "gemma-2-2b-it"
    gemma.save_pretrained(hf)
    _tokenizer().save_pretrained(hf)
    enc = CaptionEncoder.from_pretrained(hf, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(enc.encode(caps), want, rtol=0, atol=0)

    # ComfyUI's text_encoders/ layout: Gemma2Model keys under `model.`, its SentencePiece
    # model as a byte tensor, and the tokenizer.json beside it.
    comfy = tmp_path / "text_encoders"
    comfy.mkdir()
    sd = {f"model.{k}": v.contiguous() for k, v in gemma.get_decoder().state_dict().items()}
    sd["spiece_model"] = torch.zeros(8, dtype=torch.uint8)
    save_file(sd, str(comfy / "gemma_2_2b_fp32.safetensors"))
    _backend().save(str(comfy / "tokenizer.json"))
    enc = CaptionEncoder.from_pretrained(comfy / "gemma_2_2b_fp32.safetensors", device="cpu", dtype=torch.float32)
    cfg = enc.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.attn_logit_softcapping) == (2, 2, 1, 32, 256, 50.0)
    torch.testing.assert_close(enc.encode(caps), want, rtol=0, atol=0)

    # The tokenizer given explicitly, from elsewhere.
    (comfy / "tokenizer.json").rename(tmp_path / "tok.json")
    with pytest.raises(ValueError, match="tokenizer"):
        CaptionEncoder.from_pretrained(comfy / "gemma_2_2b_fp32.safetensors", device="cpu")
    enc = CaptionEncoder.from_pretrained(comfy / "gemma_2_2b_fp32.safetensors", device="cpu", dtype="fp32",
                                         tokenizer=tmp_path / "tok.json")
    prompt = enc.prefix + "a cat"
    assert enc.tokenizer(prompt)["input_ids"] == _tokenizer()(prompt)["input_ids"]
    assert enc.tokenizer.pad_token_id == SPECIAL["<pad>"] and enc.tokenizer.bos_token_id == SPECIAL["<bos>"]

    # Strict keys: a stray tensor or a missing one is refused.
    save_file({**sd, "model.layers.0.extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected"):
        CaptionEncoder.from_pretrained(tmp_path / "extra.safetensors", tokenizer=tmp_path / "tok.json", device="cpu")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        CaptionEncoder.from_pretrained(tmp_path / "short.safetensors", tokenizer=tmp_path / "tok.json", device="cpu")


def test_load_errors(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(ValueError, match="no such file"):
        CaptionEncoder.from_pretrained(tmp_path / "nowhere", device="cpu")
    with pytest.raises(ValueError, match="config.json"):
        CaptionEncoder.from_pretrained(tmp_path, device="cpu")
    save_file({"model.embed_tokens.weight": torch.zeros(8, 1024)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="hidden size 1024.*2304"):
        CaptionEncoder.from_pretrained(tmp_path / "narrow.safetensors", device="cpu", tokenizer=tmp_path / "x.json")
    narrow = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=64, hidden_size=64, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64))
    with pytest.raises(ValueError, match="hidden size 64"):
        CaptionEncoder(narrow, _tokenizer(), device="cpu")


def test_tokenizer_must_put_bos_first(gemma):
    backend = _backend()
    backend.post_processor = None
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>")
    with pytest.raises(ValueError, match="BOS"):
        CaptionEncoder(gemma, tok, device="cpu", dtype=torch.float32)


def test_encode_input_errors(encoder):
    with pytest.raises(TypeError, match="captions"):
        encoder.encode(3)
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        encoder.encode(["a", None])
    with pytest.raises(ValueError, match="captions"):
        encoder.encode([])


# -- the API ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(gemma):
    """One encoder for the API tests: its cache spares repeated Gemma runs."""
    return CaptionEncoder(gemma, _tokenizer(), device="cpu", dtype=torch.float32)


_NET = []


def _decoder(text_encoder=None):
    """A tiny PiD taking Gemma's [B, 300, 2304]; every Decoder shares one random network."""
    if not _NET:
        _NET.append(random_net(tiny("flux-2k", text_dim=2304, max_text=300), CPU, torch.float32, seed=3))
    dec = Decoder(_NET[0], CPU, torch.float32, "test")
    dec.text_encoder = text_encoder
    return dec


def test_decode_with_prompt_equals_explicit_text(shared):
    dec = _decoder(shared)
    latent = torch.randn(2, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    run = dict(seed=5, steps=1)
    want = dec.decode(latent, 0.3, text=shared.encode(["a cat", "a cat"]), **run)
    torch.testing.assert_close(pidkern.decode(latent, 0.3, prompt="a cat", model=dec, **run), want, rtol=0, atol=0)
    mixed = dec.decode(latent, 0.3, prompt=["a cat", ""], **run)
    torch.testing.assert_close(mixed, dec.decode(latent, 0.3, text=shared.encode(["a cat", ""]), **run))
    torch.testing.assert_close(mixed[0], want[0], rtol=0, atol=0)
    assert (mixed[1] - want[1]).abs().max() > 0                  # the caption reaches the image
    # No prompt, no text: zeros, which is not the empty caption.
    zeros = dec.decode(latent, 0.3, **run)
    assert (zeros[1] - mixed[1]).abs().max() > 0
    emb = dec.encode_prompt("a cat", 3)
    assert emb.shape == (3, 300, 2304) and emb.dtype == torch.float32


def test_prompt_errors(shared):
    encoder = shared
    latent = torch.randn(2, 16, 2, 2)
    bare = _decoder()
    with pytest.raises(ValueError, match=r"prompt.*text_encoder="):
        bare.decode(latent, prompt="a cat")
    dec = _decoder(encoder)
    with pytest.raises(ValueError, match="prompt: 3 captions for a batch of 2"):
        dec.decode(latent, prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="prompt and text"):
        dec.decode(latent, prompt="a", text=torch.zeros(2, 300, 2304))
    with pytest.raises(ValueError, match=r"prompt\[1\]"):
        dec.decode(latent, prompt=["a", 7])
    with pytest.raises(ValueError, match="prompt"):
        dec.decode(latent, prompt=7)
    with pytest.raises(TypeError, match="text_encoder"):
        dec.text_encoder = object()
    with pytest.raises(ValueError, match="text_encoder"):
        pidkern.decode(latent, model=bare, text_encoder=encoder, prompt="a")


def test_non_finite_encoding_is_refused(gemma, monkeypatch):
    enc = CaptionEncoder(gemma, _tokenizer(), device="cpu", dtype=torch.float32)
    monkeypatch.setattr(enc, "_encode", lambda caps: torch.full((len(caps), 300, 2304), float("inf")))
    with pytest.raises(ValueError, match="NaN or Inf"):
        _decoder(enc).encode_prompt("a cat", 1)


def test_load_attaches_the_encoder(shared):
    with pytest.warns(UserWarning, match="RANDOM"):
        dec = pidkern.load(preset=tiny("flux-2k", text_dim=2304, max_text=300), device="cpu", text_encoder=shared)
    assert dec.text_encoder is shared
    dec.text_encoder = None
    with pytest.raises(ValueError, match="prompt"):
        dec.encode_prompt("a cat", 1)


def test_module_decode_caches_per_encoder(shared, monkeypatch):
    """pidkern.decode(model=NAME, text_encoder=...) keys its cached decoder on the encoder too."""
    monkeypatch.setattr(api, "_cache", {})
    built = []

    def fake_load(preset=None, checkpoint=None, device=None, dtype=None, text_encoder=None):
        built.append(text_encoder)
        return _decoder(text_encoder)

    monkeypatch.setattr(api, "load", fake_load)
    latent = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    got = pidkern.decode(latent, 0.0, model="flux-2k", device="cpu", text_encoder=shared, prompt="a cat", steps=1,
                         seed=2)
    want = _decoder().decode(latent, 0.0, text=shared.encode("a cat"), steps=1, seed=2)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pidkern.decode(latent, 0.0, model="flux-2k", device="cpu", text_encoder=shared, prompt="", steps=1)
    assert built == [shared]                                     # reused
    with pytest.raises(ValueError, match="prompt"):              # another key: a decoder without encoder
        pidkern.decode(latent, 0.0, model="flux-2k", device="cpu", prompt="a cat", steps=1)
    assert built == [shared, None]


def test_prompt_decodes_for_every_backbone(shared):
    """decode(prompt=) on every preset a generator backbone is served by (v1, v1.5, unpack)."""
    from pidkern.latents import BACKBONES, get_backbone
    presets = {preset for b in BACKBONES for _, preset in get_backbone(b).presets}
    assert len(presets) == 10
    for preset in sorted(presets):
        cfg = tiny(preset, text_dim=2304, max_text=300)
        # PiDNet's own init: fast for a tiny net (random_net's fill is sized for the real one).
        dec = Decoder(PiDNet(cfg), CPU, torch.float32, "test", text_encoder=shared)
        latent = torch.randn(1, cfg.latent_channels, 1, 1, generator=torch.Generator().manual_seed(0))
        got = pidkern.decode(latent, 0.2, model=dec, prompt="a cat", steps=1, seed=1)
        assert got.shape == (1, 3, *cfg.output_size(1, 1)) and torch.isfinite(got).all(), preset


def test_import_pidkern_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, pidkern; assert 'transformers' not in sys.modules; "
            "pidkern.CaptionEncoder; assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
