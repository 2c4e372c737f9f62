"""Models: a tiny Stable-Diffusion-shaped pipeline built in code, the pretrained `shapes` model shipped
with the package, or a real diffusers pipeline.

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
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(**scheduler_config())
    for module in (unet, vae, text_encoder):
        module.eval()  # as from_pretrained returns them (the VAE differs slightly in training mode)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
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
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=SD15_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    for module in (unet, vae, text_encoder):
        module.eval()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# The pretrained shapes model, shipped as package data (made by `python -m ddpo_fast.pretrain_shapes`).
SHAPES_DIR = Path(__file__).resolve().parent / "weights" / "shapes"


def load_shapes_pipeline(seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """The built-in pretrained `shapes` model (64x64 scenes of coloured shapes; see ddpo_fast.shapes).
    Its weights are trained, so `seed` does not change them."""
    if not (SHAPES_DIR / "model_index.json").is_file():
        raise ValueError(f"model='shapes': the packaged weights are missing ({SHAPES_DIR}); reinstall ddpo_fast, "
                         "or make them with python -m ddpo_fast.pretrain_shapes --out DIR and pass model=DIR")
    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_DIR, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


BUILT_IN_MODELS = {
    "tiny": build_tiny_pipeline, "shapes": load_shapes_pipeline, "sd15-random": build_sd15_random_pipeline,
}


def check_model_source(model: str) -> None:
    """`model` names a built-in model, a pipeline directory or a valid hub id (checked without loading)."""
    if model in BUILT_IN_MODELS:
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model={model!r}: the directory has no model_index.json (not a diffusers pipeline saved "
                             "by save_pretrained)")
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


def load_pipeline(model: str, seed: int = TINY_SEED) -> StableDiffusionPipeline:
    """A built-in model (`tiny`, `shapes`, `sd15-random`), a local diffusers pipeline directory, or a hub id
    (loaded with from_pretrained).

    The scheduler is always a DDIMScheduler built from the pipeline's scheduler config.
    """
    if model in BUILT_IN_MODELS:
        pipe = BUILT_IN_MODELS[model](seed)
    else:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        except Exception as e:  # the loader raises many types; name the key
            raise ValueError(f"model={model!r}: cannot load a diffusers Stable Diffusion pipeline ({e})") from e
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place_pipeline(pipe: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype | None) -> None:
    """Moves the pipeline to `device`: the frozen VAE and text encoder in the mixed-precision `dtype`
    (None: fp32), the UNet in fp32 (trained; autocast gives its mixed precision)."""
    # nn.Module.to: diffusers' override warns on any dtype cast, even when no module must stay fp32.
    torch.nn.Module.to(pipe.vae, device=device, dtype=dtype or torch.float32)
    pipe.text_encoder.to(device, dtype=dtype or torch.float32)
    pipe.unet.to(device)


def set_attention(unet, attention: str) -> None:
    """`sdpa`: PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on a GPU);
    `xformers`: xformers' memory-efficient attention (needs the package)."""
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    else:
        raise ValueError(f"attention must be sdpa or xformers, got {attention!r}")


def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], device) -> torch.Tensor:
    """Text-encoder hidden states (N, L, D) for `prompts`, padded to the tokenizer's max length."""
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
