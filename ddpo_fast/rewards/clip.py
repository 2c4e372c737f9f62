"""What the CLIP-based rewards share: image preprocessing on tensors, reading a model's preprocessor
config, and image-text cosine similarity with a transformers CLIPModel (pickscore, clipscore, hpsv2;
aesthetic uses the preprocessing and the image tower).

Preprocessing runs on the reward device in fp32, batched, from uint8 (N, 3, H, W):
  - crop (CLIPImageProcessor, PickScore, ImageReward): resize the shortest side to the size (bicubic,
    antialiased), centre crop;
  - pad (open_clip's `resize_longest_max`, which HPS v2 scores with): resize the longest side to the
    size, pad the short side with black to a centred square;
then scale to [0, 1] and normalise with the mean and std.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpo_fast.rewards import options as opt

# CLIP's image normalisation (OpenAI's values), used when the model directory has no preprocessor config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        described = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {described}")


def preprocessor_config(model: str, image_size: int) -> tuple[int, tuple, tuple]:
    """(crop size, mean, std) from the model's preprocessor_config.json; CLIP's standard values when
    the directory has none."""
    from transformers import ImageProcessingMixin

    try:
        config, _ = ImageProcessingMixin.get_image_processor_dict(model)
    except OSError:
        return image_size, CLIP_MEAN, CLIP_STD
    crop = config.get("crop_size", image_size)
    size = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    return size, tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if (height, width) == tuple(x.shape[-2:]):
        return x
    # clamp: bicubic overshoots; PIL's uint8 resize saturates at 0 and 255
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def preprocess(images: torch.Tensor, size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD,
               mode: str = "crop") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> pixel values fp32 (N, 3, size, size), on the images' device (see the module doc)."""
    x = images.float() / 255.0
    h, w = x.shape[-2:]
    if mode == "crop":
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = _resize(x, new_h, new_w)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top:top + size, left:left + size]
    elif mode == "pad":
        scale = size / max(h, w)
        new_h, new_w = round(h * scale), round(w * scale)
        x = _resize(x, new_h, new_w)
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
    else:
        raise ValueError(f"preprocess: mode must be crop or pad, got {mode!r}")
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipSimilarity:
    """Cosine similarity of a CLIPModel's normalised image and prompt embeddings, batched, in fp32 out
    of a model in `dtype`. The prompts are tokenised to the text model's context length (truncated)."""

    def __init__(self, clip, tokenizer, device: torch.device, dtype: torch.dtype, batch_size: int,
                 size: int, mean: tuple, std: tuple, mode: str = "crop"):
        # read before a bf16 cast, which would round PickScore's exp(logit_scale) = 100 to ~98.9
        self.logit_scale = float(clip.logit_scale.detach().float().exp())
        self.clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer, self.device, self.dtype, self.batch_size = tokenizer, device, dtype, batch_size
        self.size, self.mean, self.std, self.mode = size, mean, std, mode
        self.context_length = clip.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = preprocess(images.to(self.device), self.size, self.mean, self.std, self.mode)
        e = self.clip.get_image_features(pixel_values=pixels.to(self.dtype))
        e = e.pooler_output.float()  # the projected embedding (transformers 5 returns an output object)
        return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.context_length,
                                return_tensors="pt").to(self.device)
        e = self.clip.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        e = e.pooler_output.float()
        return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """cos(image_i, prompt_i), fp32 (N,) on the CPU."""
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
        cos = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = slice(start, start + self.batch_size)
            cos.append((self.image_embeddings(images[chunk]) * self.text_embeddings(prompts[chunk])).sum(-1))
        return torch.cat(cos).cpu()


def clip_options(reward: str, model, processor, device, dtype, batch_size, model_example: str,
                 processor_example: str) -> dict:
    """The options that pickscore and clipscore share, validated; builds nothing."""
    model = opt.model_path(reward, "model", model, model_example)
    processor = model if processor is None or not str(processor).strip() else opt.model_path(
        reward, "processor", processor, processor_example)
    return {"model": model, "processor": processor, "device": opt.device(reward, device),
            "dtype": opt.dtype(reward, dtype, ("fp32", "bf16")),
            "batch_size": opt.integer(reward, "batch_size", batch_size)}


def load_clip_similarity(reward: str, model: str, processor: str, device: torch.device, dtype: torch.dtype,
                         batch_size: int) -> ClipSimilarity:
    """A CLIPModel from `model`, its tokenizer and preprocessing from `processor`."""
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(processor)
    except (OSError, ValueError) as e:
        raise ValueError(f"{reward} reward: processor={processor!r} has no tokenizer: {e}") from None
    size, mean, std = preprocessor_config(processor, clip.config.vision_config.image_size)
    return ClipSimilarity(clip, tokenizer, device, dtype, batch_size, size, mean, std)
