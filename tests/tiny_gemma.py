"""A tiny random Gemma-2 caption encoder built offline: 2304 wide (PiD's caption width),
one layer, a word-level tokenizer over the release's instruction prefix built with the
`tokenizers` library, BOS first as Gemma's tokenizer does."""
import re

import torch

TEXT_DIM = 2304
SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from pidkern.text import PREFIX
    from tiny_diffusers import WORDS
    vocab = dict(SPECIAL)
    for w in re.findall(r"\w+|[^\w\s]+", PREFIX + " " + " ".join(WORDS)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_gemma(seed=0, head_dim=16):
    """head_dim=256 (Gemma-2-2B's) for a model that ComfyUI's single-file layout can hold."""
    from transformers import Gemma2Config, Gemma2Model
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=256, hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma2Model(cfg).eval()
    with torch.no_grad():      # RMSNorm weights start at 0 (1-centred): make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


def tiny_caption_encoder(seed=0):
    from pidkern.text import CaptionEncoder
    return CaptionEncoder(tiny_gemma(seed), tiny_tokenizer(), device="cpu", dtype=torch.float32)


def save_tiny_gemma(path, seed=0):
    """A Hugging Face directory (config, weights, tokenizer) CaptionEncoder.from_pretrained reads."""
    tiny_gemma(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
