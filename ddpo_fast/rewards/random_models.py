"""Random-weight reward models, built and saved here so that the learned rewards run anywhere with no
download: a CLIP with its LAION-layout aesthetic MLP, a LLaVA, and a RoBERTa for BERTScore; the
human-preference models: a PickScore CLIP, an HPS v2 checkpoint (open_clip key names) with its CLIP
config, an ImageReward checkpoint (BLIP key names) with its med_config.json and BERT tokenizer. They
load through the same code as the real files; their scores mean nothing.

Two sizes: tiny (a few thousand parameters, for tests, CPU runs and examples) and full (the published
architectures: CLIP ViT-L/14, LLaVA-1.5-7B, RoBERTa-large, CLIP ViT-H/14 for PickScore and HPS v2,
BLIP ViT-L/16 + BERT-base for ImageReward; for benchmarks on a GPU). Their tokenizers are word-level
over the prompts' words (padded with filler tokens to the published vocabulary sizes).

    python -m ddpo_fast.rewards.random_models DIR [--full-size]   # saves them, prints the reward_options
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ddpo_fast.prompts import all_prompt_words

# Words of the prompts, the question and a few answers, so that the models' text is words.
WORDS = sorted(set(all_prompt_words()) | set(
    "what is happening in this image the photo shows of on with and there are two it".split()))
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %} {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")

TINY_VISION = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 30, "patch_size": 6, "projection_dim": 12}
FULL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
               "image_size": 224, "patch_size": 14, "projection_dim": 768}  # CLIP ViT-L/14
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 16}
SHAPES = {
    "tiny": {
        "clip_vision": TINY_VISION,
        "clip_text": TINY_TEXT,
        "clip_vocab": 0,  # the word list's size
        "clip_h_vision": TINY_VISION,  # PickScore's and HPS v2's CLIP, tiny: the same shapes with GELU
        "clip_h_text": TINY_TEXT,
        "blip_vision": {"hidden_size": 128, "depth": 2, "patch_size": 16, "image_size": 32},  # heads: width / 64
        "blip_text": {"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
                      "max_position_embeddings": 40},
        "bert_vocab": 0,
        "llava_vision": TINY_VISION,
        "llava_text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "max_position_embeddings": 256},
        "llava_vocab": 0,  # the word list's size
        "roberta": {"hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 48,
                    "max_position_embeddings": 140},
        "bert_layers": 2,
    },
    "full": {
        "clip_vision": FULL_VISION,
        "clip_text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "max_position_embeddings": 77},
        "clip_vocab": 49408,
        "clip_h_vision": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 1024},
        "clip_h_text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "max_position_embeddings": 77},
        "blip_vision": {"hidden_size": 1024, "depth": 24, "patch_size": 16, "image_size": 224},  # BLIP ViT-L/16
        "blip_text": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                      "max_position_embeddings": 512},  # BERT-base
        "bert_vocab": 30524,  # bert-base-uncased with BLIP's [DEC] and [ENC]
        "llava_vision": {**FULL_VISION, "image_size": 336},  # LLaVA-1.5: CLIP ViT-L/14 at 336 pixels
        "llava_text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096},
        "llava_vocab": 32064,  # Llama-2-7B (Vicuna-1.5) with LLaVA's added tokens
        "roberta": {"vocab_size": 50265, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                    "max_position_embeddings": 514},
        "bert_layers": 17,  # bert-score's layer for roberta-large
    },
}


def _image_processor(image_size: int, mean=None, std=None):
    from transformers import CLIPImageProcessorPil  # no torchvision needed; saved as a CLIPImageProcessor

    extra = {} if mean is None else {"image_mean": list(mean), "image_std": list(std)}
    return CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                 **extra)


def _save(model, path, dtype: torch.dtype) -> None:
    model.to(dtype).eval().save_pretrained(path)


def clip_tokenizer(vocab_size: int = 0):
    """A word-level CLIP-style tokenizer: <|startoftext|> words <|endoftext|>, padded with <|endoftext|>
    (as OpenAI's), its vocabulary padded with filler tokens to vocab_size."""
    from tokenizers import processors

    tokenizer = _word_tokenizer(["<|startoftext|>", "<|endoftext|>", "<unk>"], {}, vocab_size, bos="<|startoftext|>",
                                eos="<|endoftext|>", pad="<|endoftext|>", max_length=77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    return tokenizer


def save_clip(path: str | Path, size: str = "tiny", seed: int = 0, mean=None, std=None, device: str = "cpu",
              dtype: torch.dtype = torch.float32, arch: str = "vit_l") -> Path:
    """A CLIPModel with its tokenizer and preprocessor config (CLIP's mean/std unless given). arch vit_l:
    OpenAI's CLIP ViT-L/14 (quick_gelu); vit_h: the LAION ViT-H/14 of PickScore and HPS v2 (gelu)."""
    from transformers import CLIPModel

    config, tokenizer = clip_config(size, arch)
    torch.manual_seed(seed)
    with torch.device(device):
        _save(CLIPModel(config), path, dtype)
    _image_processor(config.vision_config.image_size, mean, std).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


def clip_config(size: str = "tiny", arch: str = "vit_l"):
    """(CLIPConfig, its tokenizer) of save_clip."""
    from transformers import CLIPConfig

    shapes = SHAPES[size]
    vision, text = (shapes["clip_vision"], shapes["clip_text"]) if arch == "vit_l" else (
        shapes["clip_h_vision"], shapes["clip_h_text"])
    act = {"hidden_act": "quick_gelu" if arch == "vit_l" else "gelu"}
    tokenizer = clip_tokenizer(shapes["clip_vocab"])
    tokenizer.model_max_length = text["max_position_embeddings"]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(text_config={**text, **act, "vocab_size": len(tokenizer), **ids},
                        vision_config={**vision, **act}, projection_dim=vision["projection_dim"])
    return config, tokenizer


def _random_like(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors by name: norm weights near 1, biases and embeddings small, matrices 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=generator)
        if any(part.startswith(("ln", "norm")) for part in name.split(".")):  # LayerNorms (open_clip's, timm's)
            x = 1 + 0.1 * x if name.endswith("weight") else 0.1 * x
        elif name.endswith("bias") or len(shape) == 1:
            x = 0.1 * x
        else:
            fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
            x = x / fan_in ** 0.5
        state[name] = x
    return state


def open_clip_shapes(size: str = "tiny") -> dict[str, tuple]:
    """The tensor shapes of an open_clip ViT-H-14 state dict (SHAPES[size]'s clip_h towers), by open_clip name."""
    shapes = SHAPES[size]
    v, t = shapes["clip_h_vision"], shapes["clip_h_text"]
    vocab = len(clip_tokenizer(shapes["clip_vocab"]))
    width, grid, embed = v["hidden_size"], v["image_size"] // v["patch_size"], v["projection_dim"]
    names = {"visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
             "visual.conv1.weight": (width, 3, v["patch_size"], v["patch_size"]),
             "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,),
             "visual.ln_post.weight": (width,), "visual.ln_post.bias": (width,), "visual.proj": (width, embed),
             "token_embedding.weight": (vocab, t["hidden_size"]),
             "positional_embedding": (t["max_position_embeddings"], t["hidden_size"]),
             "ln_final.weight": (t["hidden_size"],), "ln_final.bias": (t["hidden_size"],),
             "text_projection": (t["hidden_size"], embed), "logit_scale": ()}
    for prefix, tower in (("visual.", v), ("", t)):
        w, m = tower["hidden_size"], tower["intermediate_size"]
        for i in range(tower["num_hidden_layers"]):
            block = f"{prefix}transformer.resblocks.{i}."
            names.update({f"{block}ln_1.weight": (w,), f"{block}ln_1.bias": (w,), f"{block}ln_2.weight": (w,),
                          f"{block}ln_2.bias": (w,), f"{block}attn.in_proj_weight": (3 * w, w),
                          f"{block}attn.in_proj_bias": (3 * w,), f"{block}attn.out_proj.weight": (w, w),
                          f"{block}attn.out_proj.bias": (w,), f"{block}mlp.c_fc.weight": (m, w),
                          f"{block}mlp.c_fc.bias": (m,), f"{block}mlp.c_proj.weight": (w, m),
                          f"{block}mlp.c_proj.bias": (w,)})
    return names


def save_hpsv2(path: str | Path, size: str = "tiny", seed: int = 2, dtype: torch.dtype = torch.float32) -> Path:
    """An HPS v2-style checkpoint {"state_dict": ...} with open_clip's ViT-H-14 key names, written by name, not
    converted from a transformers model (the reward's renaming is what the tests check)."""
    state = _random_like({k: s for k, s in open_clip_shapes(size).items() if k != "logit_scale"}, seed)
    state["logit_scale"] = torch.tensor(4.6052)  # log(100), as trained CLIPs
    torch.save({"state_dict": {k: v.to(dtype) for k, v in state.items()}}, path)
    return Path(path)


def blip_vit_shapes(size: str = "tiny") -> dict[str, tuple]:
    """The tensor shapes of BLIP's timm ViT (SHAPES[size]'s blip_vision), by name under blip.visual_encoder."""
    v = SHAPES[size]["blip_vision"]
    width, grid = v["hidden_size"], v["image_size"] // v["patch_size"]
    names = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
             "patch_embed.proj.weight": (width, 3, v["patch_size"], v["patch_size"]), "patch_embed.proj.bias": (width,),
             "norm.weight": (width,), "norm.bias": (width,)}
    for i in range(v["depth"]):
        names.update({f"blocks.{i}.norm1.weight": (width,), f"blocks.{i}.norm1.bias": (width,),
                      f"blocks.{i}.norm2.weight": (width,), f"blocks.{i}.norm2.bias": (width,),
                      f"blocks.{i}.attn.qkv.weight": (3 * width, width), f"blocks.{i}.attn.qkv.bias": (3 * width,),
                      f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
                      f"blocks.{i}.mlp.fc1.weight": (4 * width, width), f"blocks.{i}.mlp.fc1.bias": (4 * width,),
                      f"blocks.{i}.mlp.fc2.weight": (width, 4 * width), f"blocks.{i}.mlp.fc2.bias": (width,)})
    return names


def save_imagereward(root: str | Path, size: str = "tiny", seed: int = 3, dtype: torch.dtype = torch.float32
                     ) -> dict[str, Path]:
    """ImageReward's three files under root: ImageReward.pt (BLIP key names: blip.visual_encoder.* as timm's ViT,
    blip.text_encoder.* as BLIP's BERT, mlp.layers.*, and BLIP's projection heads, which the score does not
    use), med_config.json, and a BERT WordPiece tokenizer directory."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    from ddpo_fast.rewards.aesthetic import AestheticMLP

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES[size]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [".", ",", "?"]
    words += [f"w{i}" for i in range(max(0, shapes["bert_vocab"] - len(words)))]
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    (tokenizer_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab=str(tokenizer_dir / "vocab.txt")).save_pretrained(tokenizer_dir)
    text = shapes["blip_text"]
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "layer_norm_eps": 1e-12, "model_type": "bert",
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": max(len(words), shapes["bert_vocab"]),
           "add_cross_attention": True, "encoder_width": shapes["blip_vision"]["hidden_size"], **text}
    (root / "med_config.json").write_text(json.dumps(med, indent=2))

    width = shapes["blip_vision"]["hidden_size"]
    state = {f"blip.visual_encoder.{k}": x for k, x in _random_like(blip_vit_shapes(size), seed).items()}
    torch.manual_seed(seed)
    config = BlipTextConfig(**text, vocab_size=med["vocab_size"], encoder_hidden_size=width, is_decoder=True,
                            bos_token_id=None, sep_token_id=None)
    for key, x in BlipTextModel(config, add_pooling_layer=False).state_dict().items():
        state[f"blip.text_encoder.{key}"] = x
    mlp = AestheticMLP(text["hidden_size"])  # ImageReward's head: the LAION layout
    for layer in (m for m in mlp.layers if isinstance(m, torch.nn.Linear)):  # scores of order 1 at any width
        torch.nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
        torch.nn.init.normal_(layer.bias, std=0.5)
    state.update({f"mlp.{k}": x for k, x in mlp.state_dict().items()})
    state["blip.vision_proj.weight"] = torch.zeros(256, width)  # unused by the score, as in the published file
    state["blip.text_proj.weight"] = torch.zeros(256, text["hidden_size"])
    torch.save({k: v.to(dtype) for k, v in state.items()}, root / "ImageReward.pt")
    return {"checkpoint": root / "ImageReward.pt", "med_config": root / "med_config.json", "tokenizer": tokenizer_dir}


def save_aesthetic_mlp(path: str | Path, size: str = "tiny", seed: int = 1) -> Path:
    """LAION-layout aesthetic MLP weights (.safetensors or .pth by the suffix), scores of order 1."""
    from ddpo_fast.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    mlp = AestheticMLP(SHAPES[size]["clip_vision"]["projection_dim"])
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(mlp.state_dict(), str(path))
    else:
        torch.save(mlp.state_dict(), path)
    return path


def _word_tokenizer(specials: list[str], extra_special: dict, vocab_size: int, bos: str = "<s>", eos: str = "</s>",
                    pad: str = "<pad>", max_length: int = 4096):
    """A word-level fast tokenizer over WORDS, padded with filler tokens to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = specials + WORDS + [":", "?", ".", ",", "USER", "ASSISTANT"]
    vocab += [f"w{i}" for i in range(max(0, vocab_size - len(vocab)))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token="<unk>",
                                   pad_token=pad, model_max_length=max_length, extra_special_tokens=extra_special)


def save_llava(path: str | Path, size: str = "tiny", seed: int = 0, empty_answers: bool = False, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> Path:
    """A LlavaForConditionalGeneration (CLIP vision tower + Llama) with its LlavaProcessor.
    empty_answers: zero the final norm, so every logit is 0 and greedy decoding repeats token 0
    (<pad>), which decodes to an empty answer (for tests)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    shapes = SHAPES[size]
    vision = {k: v for k, v in shapes["llava_vision"].items() if k != "projection_dim"}
    tokenizer = _word_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"], {"image_token": "<image>"},
                                shapes["llava_vocab"])
    processor = LlavaProcessor(image_processor=_image_processor(vision["image_size"]), tokenizer=tokenizer,
                               patch_size=vision["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE)
    text = LlamaConfig(vocab_size=len(tokenizer), **shapes["llava_text"], bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    with torch.device(device):  # random init of 7B parameters: minutes on a CPU, seconds on a GPU
        model = LlavaForConditionalGeneration(config)
    if empty_answers:
        with torch.no_grad():
            model.model.language_model.norm.weight.zero_()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save(model, path, dtype)
    processor.save_pretrained(path)
    return Path(path)


def save_roberta(path: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Path:
    """A RobertaModel (BERTScore's default family) with a byte-level BPE tokenizer trained on WORDS."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 4, vocab_size=400, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as tmp:  # its vocab.json and merges.txt, for transformers' RoBERTa tokenizer
        vocab_file, merges_file = bpe.save_model(tmp)
        vocab = json.loads(Path(vocab_file).read_text())
        merges = [tuple(line.split()) for line in Path(merges_file).read_text().splitlines()[1:] if line.strip()]
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=128)
    torch.manual_seed(seed)
    shapes = SHAPES[size]["roberta"]
    config = RobertaConfig(**{"vocab_size": len(tokenizer), **shapes}, pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        _save(RobertaModel(config), path, dtype)
    tokenizer.save_pretrained(path)
    return Path(path)


REWARDS = ("aesthetic", "llava_bertscore", "pickscore", "clipscore", "hpsv2", "imagereward")


def save_reward_models(root: str | Path, size: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                       rewards: tuple[str, ...] = REWARDS) -> dict[str, str]:
    """Saves the random models of `rewards` under root; returns the reward_options of each."""
    unknown = sorted(set(rewards) - set(REWARDS))
    if unknown:
        raise ValueError(f"rewards: no random models for {', '.join(unknown)}; known: {', '.join(REWARDS)}")
    root, options = Path(root), {}
    if "aesthetic" in rewards or "clipscore" in rewards:
        clip = save_clip(root / "clip", size, device=device, dtype=dtype)
        if "aesthetic" in rewards:
            mlp = save_aesthetic_mlp(root / "aesthetic_mlp.safetensors", size)
            options["aesthetic"] = f"clip_model={clip},mlp_weights={mlp}"
        if "clipscore" in rewards:
            options["clipscore"] = f"model={clip}"
    if "llava_bertscore" in rewards:
        llava = save_llava(root / "llava", size, device=device, dtype=dtype)
        bert = save_roberta(root / "roberta", size, device=device, dtype=dtype)
        options["llava_bertscore"] = f"vlm_model={llava},bert_model={bert},bert_layers={SHAPES[size]['bert_layers']}"
    if "pickscore" in rewards or "hpsv2" in rewards:
        # PickScore's model (its processor in the same directory); HPS v2 reads only its config and tokenizer
        clip_h = save_clip(root / "pickscore", size, seed=4, device=device, dtype=dtype, arch="vit_h")
        if "pickscore" in rewards:
            options["pickscore"] = f"model={clip_h},processor={clip_h}"
        if "hpsv2" in rewards:
            options["hpsv2"] = f"checkpoint={save_hpsv2(root / 'hpsv2.pt', size, dtype=dtype)},clip_model={clip_h}"
    if "imagereward" in rewards:
        files = save_imagereward(root / "imagereward", size, dtype=dtype)
        options["imagereward"] = ",".join(f"{k}={v}" for k, v in files.items())
    return options


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to save the models in")
    parser.add_argument("--full-size", action="store_true",
                        help="the published architectures (about 20 GB; built on the GPU when there is one)")
    parser.add_argument("--rewards", default=",".join(REWARDS), help="comma-separated rewards whose models to save")
    args = parser.parse_args(argv)
    size = "full" if args.full_size else "tiny"
    unknown = sorted(set(args.rewards.split(",")) - set(REWARDS))
    if unknown:
        parser.error(f"--rewards: no random models for {', '.join(unknown)}; known: {', '.join(REWARDS)}")
    full_on_gpu = args.full_size and torch.cuda.is_available()
    options = save_reward_models(args.out, size, device="cuda" if full_on_gpu else "cpu",
                                 dtype=torch.bfloat16 if args.full_size else torch.float32,
                                 rewards=tuple(args.rewards.split(",")))
    for reward, reward_options in options.items():
        print(f"reward={reward} reward_options={reward_options}")


if __name__ == "__main__":
    main()
