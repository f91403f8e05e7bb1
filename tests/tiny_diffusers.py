"""Tiny random diffusers components built offline from their configs (no downloads): a
FLUX.1 pipeline and a VAE of each family PiD decodes. Real library classes, random weights,
widths of a few channels so a whole run takes a fraction of a second on a CPU."""
import torch

WORDS = "a an the cat dog on of in red blue green photo painting table sky house".split()


def word_tokenizer(max_length: int):
    """A word-level tokenizer built with the `tokenizers` library and wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   model_max_length=max_length)


def tiny_kl_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, blocks=4, seed=0):
    """An AutoencoderKL with stride 2**(blocks-1); FLUX.1's scale and shift by default."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * blocks,
                         up_block_types=["UpDecoderBlock2D"] * blocks, block_out_channels=[4] * blocks,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2,
                         use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def tiny_flux2_vae(seed=0):
    """AutoencoderKLFlux2: 32 channels at stride 8, patchified 2x2 to FLUX.2's 128 at 16."""
    from diffusers import AutoencoderKLFlux2
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=[4] * 4, layers_per_block=1, norm_num_groups=2,
                             latent_channels=32).eval()
    with torch.no_grad():   # BatchNorm statistics that are not the identity, so normalising shows
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae


def tiny_qwen_vae(seed=0):
    """AutoencoderKLQwenImage (a causal 3-D VAE; images are T=1 videos), stride 8, 16 channels."""
    from diffusers import AutoencoderKLQwenImage
    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()


def tiny_flux_pipeline(seed=0):
    """A FluxPipeline of a one-block transformer, tiny CLIP and T5 encoders, a 16-channel
    stride-8 VAE and the default flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    n = len(WORDS) + 3
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=16, num_attention_heads=2,
                                        num_hidden_layers=1, projection_dim=16, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=2, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=2))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=[2, 2, 4])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_kl_vae(seed=seed), text_encoder=clip,
                        tokenizer=word_tokenizer(8), text_encoder_2=t5, tokenizer_2=word_tokenizer(16),
                        transformer=transformer)
    for module in (clip, t5, transformer):
        module.eval()       # from_pretrained's state: T5's dropout would make runs differ
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed=0):
    """A StableDiffusionXLPipeline: a two-level UNet with SDXL's text-time conditioning, two
    tiny CLIP encoders (the second with a projection), a 4-channel stride-8 VAE and the
    Euler scheduler SDXL ships with (sigmas in its variance-exploding frame)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,   # six time ids x 8, plus the pooled text
        cross_attention_dim=32, norm_num_groups=4)
    cfg = dict(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=16, num_attention_heads=2,
               num_hidden_layers=1, projection_dim=16, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
               pad_token_id=0)
    clip, clip2 = CLIPTextModel(CLIPTextConfig(**cfg)), CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=tiny_kl_vae(4, 0.13025, None, seed=seed), text_encoder=clip.eval(),
                                     text_encoder_2=clip2.eval(), tokenizer=word_tokenizer(8),
                                     tokenizer_2=word_tokenizer(8), unet=unet.eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen3(cls):
    """A two-layer Qwen3 text encoder (`cls`: Qwen3Model or Qwen3ForCausalLM) and the word
    tokenizer with a plain chat template, as FLUX.2-klein and Z-Image prompt them."""
    from transformers import Qwen3Config
    tok = word_tokenizer(16)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    model = cls(Qwen3Config(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0))
    return tok, model


KLEIN_TEXT_LAYERS = (1, 2, 2)   # the pipeline stacks these hidden states (the real one: 9, 18, 27)


def tiny_klein_pipeline(seed=0):
    """A Flux2KleinPipeline: a one-block FLUX.2 transformer, a two-layer Qwen3 text encoder
    (the tokenizer gets a plain chat template), the AutoencoderKLFlux2 above. Its final
    `output_type="latent"` result is the raw 32-channel VAE latent; its step callback sees
    BatchNorm-normalised 128-channel tokens. Call it with text_encoder_out_layers=KLEIN_TEXT_LAYERS."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM
    torch.manual_seed(seed)
    tok, qwen = tiny_qwen3(Qwen3ForCausalLM)
    transformer = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, joint_attention_dim=16 * len(KLEIN_TEXT_LAYERS),
                                          timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                          guidance_embeds=False)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_flux2_vae(seed),
                              text_encoder=qwen.eval(), tokenizer=tok, transformer=transformer.eval(),
                              is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_zimage_pipeline(seed=0):
    """A ZImagePipeline: a one-layer Z-Image transformer, a two-layer Qwen3 text encoder (plain
    chat template) and FLUX.1's 16-channel VAE; its latents stay [B, 16, h, w] throughout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model
    torch.manual_seed(seed)
    tok, qwen = tiny_qwen3(Qwen3Model)
    transformer = ZImageTransformer2DModel(in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_kl_vae(seed=seed),
                          text_encoder=qwen.eval(), tokenizer=tok, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe
