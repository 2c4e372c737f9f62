"""The built-in models, and loading any model behind its family's interface (ddpo_fast.families).

Built in: `tiny`, `tiny-sdxl` and `tiny-sd3` (random weights built in code, one per family), the
pretrained `shapes` model shipped with the package, and `sd15-random` (SD 1.5's shapes, random
weights). Anything else is a diffusers pipeline directory or hub id, loaded with from_pretrained.

`model=tiny` builds a UNet2DConditionModel, an AutoencoderKL (8x spatial downsampling, 4 latent
channels, like SD), a CLIP text encoder and a CLIP tokenizer whose vocabulary is generated here
(every character, plus one token per word of the built-in prompt sets), all with seeded random
weights. Nothing is downloaded. `save_pretrained` writes a normal diffusers directory that
`StableDiffusionPipeline.from_pretrained` (or `model=DIR`) loads back.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ddpo_fast.families import FAMILIES, ModelFamily, family_for_pipeline_class, wrap

from ddpo_fast.prompts import all_prompt_words
from ddpo_fast.shapes import caption_words as shape_caption_words

TINY_RESOLUTION = 64  # pixels; latents are 4 x 8 x 8
TINY_MAX_LENGTH = 16  # tokens per prompt
TINY_SEED = 1234
SHAPES_MAX_LENGTH = 16  # tokens per prompt of the shapes model (its captions need at most 9)


def scheduler_config() -> dict:
    """Stable Diffusion v1's DDIM schedule (scaled-linear betas, final alpha from alphas_cumprod[0])."""
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def code_tokenizer(words: list[str], max_length: int, *, merge_from_end: bool = False) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a vocabulary generated in code.

    Tokens: the two specials, every printable character alone and as a word end (`c</w>`), and every
    word of `words`, reached through a chain of merges. Any other word falls back to characters, so
    every ASCII prompt tokenizes.

    Left-to-right chains (`c`+`a`, `ca`+`t</w>`) can break a word: BPE applies the lowest-ranked pair
    anywhere in it, so "squares" becomes `squa re s</w>` once "red" has ranked `r`+`e` first. Chains
    from the end (`t`+`s</w>`, then `a`+`ts</w>`) cannot: every merge joins a word-end token, which a
    word holds only at its end, so every listed word is one token (`merge_from_end=True`).
    """
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if merge_from_end:
            merged = pieces[-1]
            for piece in reversed(pieces[:-1]):
                merge = (piece, merged)
                if merge not in merges:
                    merges.append(merge)
                merged = piece + merged
                add(merged)
            continue
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            if merge not in merges:
                merges.append(merge)
            merged = merged + piece
            add(merged)
    add("<|startoftext|>")
    add("<|endoftext|>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_tokenizer(max_length: int = TINY_MAX_LENGTH) -> CLIPTokenizer:
    """The tiny model's tokenizer: one token per word of the built-in prompt sets (the shapes words
    are not among them: adding them would change the tiny model's seeded random weights)."""
    return code_tokenizer(all_prompt_words(), max_length)


def shapes_tokenizer() -> CLIPTokenizer:
    """The shapes model's tokenizer: every caption word of the shapes data set is one token, so the
    longest caption ("three red circles and a blue square") is 9 tokens of the 16."""
    return code_tokenizer(shape_caption_words(), SHAPES_MAX_LENGTH, merge_from_end=True)


def build_tiny_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """The tiny SD-shaped pipeline with seeded random weights (same seed, same weights)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, **TINY_CLIP))
    scheduler = DDIMScheduler(**scheduler_config())
    _eval(unet, vae, text_encoder)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _tiny_vae(latent_channels: int = 4, **config) -> AutoencoderKL:
    """An 8x-downsampling VAE of a few thousand parameters."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=TINY_RESOLUTION, **config,
    )


TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _clip_config(tokenizer, **sizes) -> CLIPTextConfig:
    """A CLIP text encoder's config of the given sizes for `tokenizer` (its vocabulary, length, special tokens)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **sizes,
    )


def _eval(*modules) -> None:
    for module in modules:
        module.eval()  # as from_pretrained returns them (the VAE differs slightly in training mode)


def build_tiny_sdxl_pipeline(seed: int = TINY_SEED) -> StableDiffusionXLPipeline:
    """`tiny-sdxl`: SDXL's structure (two CLIP text encoders, the second with a projection; a UNet with
    text_time added conditioning) at the tiny model's size, seeded random weights."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=64, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled (projection_dim) + 6 time ids x 8
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, **TINY_CLIP))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, **TINY_CLIP, projection_dim=32))
    _eval(unet, vae, text_encoder, text_encoder_2)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=DDIMScheduler(**scheduler_config()), force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_sd3_pipeline(seed: int = TINY_SEED) -> StableDiffusion3Pipeline:
    """`tiny-sd3`: SD3's structure (an MMDiT transformer, two CLIP text encoders with projections, no
    T5, a 16-channel VAE with a shift factor, SD3's shifted flow-matching schedule) at the tiny
    model's size, seeded random weights."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8, patch_size=1, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64,  # the two CLIPs' hidden states side by side
        pooled_projection_dim=64,  # the two CLIPs' projections side by side
        pos_embed_max_size=TINY_RESOLUTION // 8,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, **TINY_CLIP, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, **TINY_CLIP, projection_dim=32))
    _eval(transformer, vae, text_encoder, text_encoder_2)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


# Stable Diffusion v1.5's architecture (UNet 859.5M parameters, VAE, CLIP ViT-L/14 text encoder).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, sample_size=512,
)
SD15_MAX_LENGTH = 77


def build_sd15_random_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """A pipeline of Stable Diffusion v1.5's shapes with seeded random weights (`model=sd15-random`),
    for throughput and memory measurements at full size without downloading weights. The tokenizer
    is the tiny one (with SD's 77 tokens), the text encoder CLIP ViT-L/14's text tower."""
    tokenizer = tiny_tokenizer(SD15_MAX_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD15_VAE)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=768, intermediate_size=3072,
                                              num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"))
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# Stable Diffusion 3.5 medium's architecture (MMDiT 2.5B parameters, CLIP-L and CLIP-G text encoders;
# T5 left out, as diffusers allows, its tokens then zeros; the 16-channel VAE).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35M_VAE = dict(SD15_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                 use_post_quant_conv=False, sample_size=1024)
SD35M_CLIPS = [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768),  # CLIP ViT-L/14's text tower
               dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, hidden_act="gelu")]  # OpenCLIP ViT-bigG/14's


def build_sd35m_random_pipeline(seed: int = TINY_SEED) -> StableDiffusion3Pipeline:
    """A pipeline of Stable Diffusion 3.5 medium's shapes with seeded random weights
    (`model=sd35m-random`), for throughput and memory measurements of the flow SDE path at full size."""
    tokenizer = tiny_tokenizer(SD15_MAX_LENGTH)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD35M_VAE)
    torch.manual_seed(seed + 2)
    clip_l, clip_g = (CLIPTextModelWithProjection(_clip_config(tokenizer, **clip)) for clip in SD35M_CLIPS)
    _eval(transformer, vae, clip_l, clip_g)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_l,
        tokenizer=tokenizer, text_encoder_2=clip_g, tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )


# The pretrained shapes model, shipped as package data (made by `python -m ddpo_fast.pretrain_shapes`).
SHAPES_DIR = Path(__file__).resolve().parent / "weights" / "shapes"


def load_shapes_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """The built-in pretrained `shapes` model (64x64 scenes of coloured shapes; see ddpo_fast.shapes).
    Its weights are trained, so `seed` does not change them."""
    if not (SHAPES_DIR / "model_index.json").is_file():
        raise ValueError(f"model='shapes': the packaged weights are missing ({SHAPES_DIR}); reinstall ddpo_fast, "
                         "or make them with python -m ddpo_fast.pretrain_shapes --out DIR and pass model=DIR")
    return FAMILIES["sd"].from_pretrained(SHAPES_DIR).pipe


BUILT_IN_MODELS = {
    "tiny": build_tiny_pipeline, "tiny-sdxl": build_tiny_sdxl_pipeline, "tiny-sd3": build_tiny_sd3_pipeline,
    "shapes": load_shapes_pipeline, "sd15-random": build_sd15_random_pipeline,
    "sd35m-random": build_sd35m_random_pipeline,
}
BUILT_IN_FAMILIES = {"tiny-sdxl": "sdxl", "tiny-sd3": "sd3", "sd35m-random": "sd3"}  # the others are sd


def check_model_source(model: str) -> None:
    """`model` names a built-in model, a pipeline directory or a valid hub id (checked without loading)."""
    if model in BUILT_IN_MODELS:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model={model!r}: the directory has no model_index.json (not a diffusers pipeline saved "
                             "by save_pretrained)")
        family_name(model)
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or path.exists():  # a path, not a hub id
        raise ValueError(f"model={model!r}: no such directory (expected {', '.join(BUILT_IN_MODELS)}, a diffusers "
                         "pipeline directory or a hub id like runwayml/stable-diffusion-v1-5)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError as e:
        raise ValueError(f"model={model!r}: neither {', '.join(BUILT_IN_MODELS)}, a directory, nor a valid hub id "
                         f"({e})") from None


def family_name(model: str) -> str:
    """The family (sd, sdxl, sd3) of a built-in model, or read from a pipeline's model_index.json (for a
    hub id this fetches that one file)."""
    if model in BUILT_IN_MODELS:
        return BUILT_IN_FAMILIES.get(model, "sd")
    from diffusers import DiffusionPipeline

    try:
        class_name = DiffusionPipeline.load_config(str(Path(model).expanduser()) if Path(model).expanduser().is_dir()
                                                   else model)["_class_name"]
    except Exception as e:  # the hub client raises many types; name the key
        raise ValueError(f"model={model!r}: cannot read its model_index.json ({e})") from e
    return family_for_pipeline_class(class_name, model).name


def load_model(model: str, seed: int = TINY_SEED, resolution: int = 0) -> ModelFamily:
    """A built-in model (see BUILT_IN_MODELS), a local diffusers pipeline directory, or a hub id (loaded with
    from_pretrained), behind its family's interface, sampling at `resolution` pixels (0: the model's own).
    DDIM families get a DDIMScheduler built from the pipeline's scheduler config."""
    if model in BUILT_IN_MODELS:
        family = wrap(BUILT_IN_MODELS[model](seed), resolution)
    else:
        family_class = FAMILIES[family_name(model)]
        try:
            pipe = family_class.from_pretrained(model).pipe
        except Exception as e:  # the loader raises many types; name the key
            raise ValueError(f"model={model!r}: cannot load a diffusers {family_class.pipeline_class_name} ({e})") from e
        family = family_class(pipe, resolution)
    family.pipe.set_progress_bar_config(disable=True)
    return family


def set_attention(denoiser, attention: str) -> None:
    """`sdpa`: PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on a GPU; the
    denoisers' default processors call it); `xformers`: xformers' memory-efficient attention (needs
    the package)."""
    if attention == "xformers":
        denoiser.enable_xformers_memory_efficient_attention()
    elif attention != "sdpa":
        raise ValueError(f"attention must be sdpa or xformers, got {attention!r}")
