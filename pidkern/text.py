"""The release's caption encoder: Gemma-2-2B-it turns captions into PiD's [B, 300, 2304].

The recipe, read off the release (`PixelDiTModel._encode_text_raw` in
`pid/_src/models/pixeldit_model.py`, with `chi_prompt` from the experiment configs; the
2k, 2kto4k and v1.5 configs carry the same instruction text):

1. Every caption, the empty one too, is appended to a fixed instruction prefix (the
   prefix's lines joined by newlines, ending in "User Prompt: "; nothing is inserted
   between prefix and caption).
2. The tokenizer (Gemma's; it adds BOS, no EOS) runs on the joined strings with
   `max_length = n + 298`, where n is the token count of the prefix alone, BOS included;
   right padding to exactly that length, truncation on the right (a long caption loses its
   tail; prefix and BOS stay).
3. Gemma-2's decoder (the causal LM without its head) runs on ids and attention mask; its
   final hidden state (after the final RMSNorm) is taken at every position, padding included.
4. Rows kept: position 0 (BOS) and the last 299 positions, in that order: 300 rows.
   No mask is passed on: the PiD network attends over all 300 rows.
5. The release runs Gemma in bfloat16 (then hands the rows to the network as float32).

Where other ports differ, the release wins. ComfyUI's PixelDiT text encoder
(`comfy/text_encoders/pixeldit.py`) encodes an empty or whitespace-only caption as BOS
plus padding to 300 without the prefix, and passes a caption that already starts with the
prefix through verbatim; here the prefix always goes first, as in the release.

`transformers` is imported only when an encoder is built, so `import pidkern` stays light.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

# The release's instruction prefix, one entry per line of its `chi_prompt` list.
PREFIX_LINES = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for '
    'image generation. Evaluate the level of detail in the user prompt:',
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
PREFIX = "\n".join(PREFIX_LINES)
MAX_TOKENS = 300       # rows PiD takes: BOS + the last 299 positions
TEXT_DIM = 2304        # Gemma-2-2B's hidden size, PiD's caption width
HEAD_DIM = 256         # Gemma-2-2B's head width; not readable from weight shapes alone
GEMMA2_2B = dict(      # google/gemma-2-2b-it config.json (as re-hosted by Efficient-Large-Model)
    vocab_size=256000, hidden_size=TEXT_DIM, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=HEAD_DIM, query_pre_attn_scalar=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
)
GEMMA_SPECIAL = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
# Keys a ComfyUI text_encoders/ file may carry besides the decoder's weights: its
# SentencePiece model as bytes, and a tied LM head.
_NON_WEIGHTS = ("spiece_model", "lm_head.weight")
_CHUNK = 16            # captions per Gemma forward; bounds activation memory

_INSTALL = 'the caption encoder needs transformers and tokenizers: pip install "pidkern[text]"'


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return transformers


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # from_pretrained's argument was renamed torch_dtype -> dtype in transformers 4.56.
    major, minor = (int(p) for p in _transformers().__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _check_width(hidden: int, what: str) -> None:
    if hidden != TEXT_DIM:
        raise ValueError(f"{what}: hidden size {hidden}; PiD's captions are {TEXT_DIM} wide (Gemma-2-2B-it)")


class CaptionEncoder:
    """Gemma-2-2B-it with the release's caption recipe (see the module docstring).

    model: a transformers Gemma-2 decoder (`Gemma2Model`) or causal LM (its decoder is used).
    tokenizer: its transformers tokenizer; must put BOS first and have a pad token.
        Its padding and truncation sides are set to "right", as the release does.
    device: where Gemma runs and where `encode` returns; None = the model's device.
    dtype: Gemma's weights and the result (the release: bfloat16).
    offload: keep Gemma in host memory between encodes (~5 GB of GPU memory freed);
        it moves to `device` for each encode that misses the cache.
    cache_size: captions whose rows are kept (LRU); 0 disables the cache.
    """

    def __init__(self, model, tokenizer, device=None, dtype=torch.bfloat16, offload: bool = False,
                 cache_size: int = 16):
        from .resolve import resolve_device, resolve_dtype
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a transformers Gemma-2 model (torch.nn.Module), got {type(model).__name__}")
        decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
        model = decoder if isinstance(decoder, torch.nn.Module) else model
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise TypeError(f"model: {type(model).__name__} has no config.hidden_size; expected a transformers model")
        _check_width(hidden, "model")
        if not callable(tokenizer) or getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(f"tokenizer: expected a transformers tokenizer with a pad token, got {type(tokenizer).__name__}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size={cache_size!r}: expected an int >= 0")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        first = tokenizer("")["input_ids"]
        if not first or first[0] != tokenizer.bos_token_id:
            # Row 0 of the result is meant to be BOS, as with Gemma's tokenizer.
            raise ValueError(f"tokenizer: must start every sequence with BOS (id {tokenizer.bos_token_id}); "
                             f"it encodes '' as {first}")
        if device is None:
            device = next(model.parameters()).device
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.offload = bool(offload)
        self.model = model.eval().requires_grad_(False).to(self.home, self.dtype)
        self.tokenizer = tokenizer
        self.prefix = PREFIX
        self.prefix_tokens = len(tokenizer(PREFIX)["input_ids"])   # BOS included, as the release counts
        self.max_length = self.prefix_tokens + MAX_TOKENS - 2
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def home(self) -> torch.device:
        """Where Gemma waits between encodes."""
        return torch.device("cpu") if self.offload else self.device

    def __repr__(self):
        return (f"CaptionEncoder({type(self.model).__name__}, device={self.device}, dtype={self.dtype}, "
                f"offload={self.offload}, cached={len(self._cache)}/{self.cache_size})")

    # -- building -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=torch.bfloat16, offload: bool = False, tokenizer=None,
                        cache_size: int = 16) -> "CaptionEncoder":
        """Load Gemma-2-2B-it from local files only (nothing is downloaded).

        path: a Hugging Face model directory (config.json, weights, tokenizer; the release
            uses Efficient-Large-Model/gemma-2-2b-it), or one .safetensors file in ComfyUI's
            text_encoders/ layout (e.g. gemma_2_2b_fp16.safetensors: `model.`-prefixed
            Gemma2Model keys), whose config is Gemma-2-2B's with layer, vocabulary and MLP
            sizes read from the tensor shapes.
        tokenizer: a transformers tokenizer, a tokenizer.json file or a tokenizer directory.
            Default: the model directory's own, or a tokenizer.json next to the .safetensors.
        device: default CUDA when available, else CPU. Other arguments: see the class.
        """
        from .resolve import resolve_device, resolve_dtype
        _transformers()
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path={path!r}: expected a model directory or a .safetensors file path")
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"path={str(path)!r}: no such file or directory; expected a Hugging Face Gemma-2-2B-it "
                             f"directory or a ComfyUI text_encoders/ .safetensors file")
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if p.is_dir():
            model, default_tok = _load_hf_dir(p, dt)
        elif p.suffix == ".safetensors":
            model, default_tok = _load_comfy_file(p, dt), p.parent / "tokenizer.json"
        else:
            raise ValueError(f"path={str(path)!r}: expected a directory or a .safetensors file, got a "
                             f"{p.suffix or 'suffix-less'} file")
        tok = _load_tokenizer(tokenizer if tokenizer is not None else default_tok, given=tokenizer is not None,
                              model_path=p)
        return cls(model, tok, device=dev, dtype=dt, offload=offload, cache_size=cache_size)

    # -- encoding -------------------------------------------------------------------------
    def encode(self, captions) -> torch.Tensor:
        """Captions (a str or a list of str) -> [B, 300, 2304] on `device` in `dtype`."""
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, (list, tuple)):
            raise TypeError(f"captions: expected a str or a list of str, got {type(captions).__name__}")
        if not captions:
            raise ValueError("captions: empty list; expected at least one caption")
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"captions[{i}]={c!r}: expected a str")
        with self._lock:
            rows = {c: self._cache[c] for c in dict.fromkeys(captions) if c in self._cache}
            for c in rows:
                self._cache.move_to_end(c)
            todo = [c for c in dict.fromkeys(captions) if c not in rows]
            if todo:
                with self._on_device():
                    for start in range(0, len(todo), _CHUNK):
                        chunk = todo[start:start + _CHUNK]
                        rows.update(zip(chunk, self._encode(chunk)))
                if self.cache_size:
                    for c in todo:
                        self._cache[c] = rows[c]
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            return torch.stack([rows[c] for c in captions])

    @contextmanager
    def _on_device(self):
        if not self.offload or self.device.type == "cpu":
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to("cpu")

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> torch.Tensor:
        batch = self.tokenizer([self.prefix + c for c in captions], max_length=self.max_length,
                               padding="max_length", truncation=True, return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"].to(self.device),
                         attention_mask=batch["attention_mask"].to(self.device), use_cache=False)
        hidden = out[0]
        length = hidden.shape[1]
        keep = torch.tensor([0] + list(range(length - (MAX_TOKENS - 1), length)), device=hidden.device)
        # clone: a cached row must not keep the whole [B, max_length, 2304] block alive.
        return hidden.index_select(1, keep).to(self.dtype).clone()


# -- loading helpers ----------------------------------------------------------------------------

def _load_hf_dir(p: Path, dtype):
    tf = _transformers()
    if not (p / "config.json").exists():
        raise ValueError(f"path={str(p)!r}: a directory without config.json; expected a Hugging Face "
                         f"Gemma-2-2B-it directory (e.g. a local copy of Efficient-Large-Model/gemma-2-2b-it)")
    config = tf.AutoConfig.from_pretrained(p, local_files_only=True)
    _check_width(getattr(config, "hidden_size", None), f"path={str(p)!r}")
    lm = tf.AutoModelForCausalLM.from_pretrained(p, local_files_only=True, **_dtype_kwarg(dtype))
    return lm.get_decoder(), p


def _comfy_state(sd: dict, where: str) -> dict:
    """ComfyUI's keys -> Gemma2Model's: strip the one prefix in front of `embed_tokens.weight`."""
    emb = [k for k in sd if k.endswith("embed_tokens.weight")]
    if len(emb) != 1:
        raise ValueError(f"{where}: expected one '*embed_tokens.weight' tensor (a Gemma-2 text encoder), found "
                         f"{len(emb)}; keys start {sorted(sd)[:5]}")
    prefix = emb[0][:-len("embed_tokens.weight")]
    out, extra = {}, []
    for k, v in sd.items():
        if k.startswith(prefix):
            out[k[len(prefix):]] = v
        elif not any(k.endswith(n) for n in _NON_WEIGHTS):
            extra.append(k)
    if extra:
        raise ValueError(f"{where}: {len(extra)} keys outside the '{prefix}' Gemma-2 weights, e.g. {extra[:5]}")
    return out


def _gemma2_config(sd: dict, where: str):
    tf = _transformers()
    vocab, hidden = sd["embed_tokens.weight"].shape
    _check_width(hidden, where)
    layers = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
    try:
        inter = sd["layers.0.mlp.gate_proj.weight"].shape[0]
        q = sd["layers.0.self_attn.q_proj.weight"].shape[0]
        kv = sd["layers.0.self_attn.k_proj.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{where}: missing Gemma-2 tensor {e.args[0]!r}") from None
    if q % HEAD_DIM or kv % HEAD_DIM:
        raise ValueError(f"{where}: attention widths q={q}, k={kv} are not multiples of Gemma-2-2B's head width "
                         f"{HEAD_DIM}")
    values = dict(GEMMA2_2B, vocab_size=vocab, num_hidden_layers=len(layers), intermediate_size=inter,
                  num_attention_heads=q // HEAD_DIM, num_key_value_heads=kv // HEAD_DIM)
    return tf.Gemma2Config(**values)


def _load_comfy_file(p: Path, dtype):
    from safetensors.torch import load_file
    tf = _transformers()
    where = f"path={str(p)!r}"
    sd = _comfy_state(load_file(str(p)), where)
    config = _gemma2_config(sd, where)
    with torch.device("meta"):
        expected = set(tf.Gemma2Model(config).state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{where}: not Gemma-2's weights: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")
    return tf.Gemma2Model.from_pretrained(None, config=config, state_dict=sd, **_dtype_kwarg(dtype))


def _load_tokenizer(tok, given: bool, model_path: Path):
    tf = _transformers()
    if not isinstance(tok, (str, Path)):
        return tok                      # a tokenizer object; CaptionEncoder checks it
    t = Path(tok).expanduser()
    if not t.exists():
        if given:
            raise ValueError(f"tokenizer={str(tok)!r}: no such file or directory; expected Gemma-2's "
                             f"tokenizer.json or a tokenizer directory")
        raise ValueError(f"tokenizer: none found for {str(model_path)!r} (looked for {str(t)!r}); pass "
                         f"tokenizer=PATH to Gemma-2-2B-it's tokenizer.json (from google/gemma-2-2b-it). "
                         f"The SentencePiece model a ComfyUI file may embed is not read")
    if t.is_dir():
        return tf.AutoTokenizer.from_pretrained(t, local_files_only=True)
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_file=str(t), **GEMMA_SPECIAL)
    vocab = tokenizer.get_vocab()
    absent = [s for s in GEMMA_SPECIAL.values() if s not in vocab]
    if absent:
        raise ValueError(f"tokenizer={str(tok)!r}: lacks Gemma's special tokens {absent}; expected Gemma-2's "
                         f"tokenizer.json")
    return tokenizer


def resolve_text_encoder(value, device: torch.device):
    """None, a CaptionEncoder, or a path to Gemma-2-2B-it (loaded on `device`)."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        return CaptionEncoder.from_pretrained(value, device=device)
    if not isinstance(value, CaptionEncoder):
        raise TypeError(f"text_encoder: expected None, a path or a pidkern.CaptionEncoder, got {type(value).__name__}")
    return value
