"""Random-weight reward models, built and saved here so that the learned rewards run anywhere with no
download: a CLIP with its LAION-layout aesthetic MLP, a LLaVA, and a RoBERTa for BERTScore. They load
through the same from_pretrained code as the real models; their scores mean nothing.

Two sizes: tiny (a few thousand parameters, for tests, CPU runs and examples) and full (the paper's
architectures: CLIP ViT-L/14, LLaVA-1.5-7B, RoBERTa-large; for benchmarks on a GPU).

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
SHAPES = {
    "tiny": {
        "clip_vision": TINY_VISION,
        "clip_text": {"vocab_size": 99, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "max_position_embeddings": 16},
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
        "clip_text": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "max_position_embeddings": 77},
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


def save_clip(path: str | Path, size: str = "tiny", seed: int = 0, mean=None, std=None, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> Path:
    """A CLIPModel and its preprocessor config (CLIP's mean/std unless given)."""
    from transformers import CLIPConfig, CLIPModel

    shapes = SHAPES[size]
    torch.manual_seed(seed)
    config = CLIPConfig(text_config={**shapes["clip_text"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                        vision_config=shapes["clip_vision"], projection_dim=shapes["clip_vision"]["projection_dim"])
    with torch.device(device):
        _save(CLIPModel(config), path, dtype)
    _image_processor(shapes["clip_vision"]["image_size"], mean, std).save_pretrained(path)
    return Path(path)


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


def _word_tokenizer(specials: list[str], extra_special: dict, vocab_size: int):
    """A word-level fast tokenizer over WORDS, padded with filler tokens to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = specials + WORDS + [":", "?", ".", ",", "USER", "ASSISTANT"]
    vocab += [f"w{i}" for i in range(max(0, vocab_size - len(vocab)))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096, extra_special_tokens=extra_special)


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


def save_reward_models(root: str | Path, size: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                       rewards: tuple[str, ...] = ("aesthetic", "llava_bertscore")) -> dict[str, str]:
    """Saves the random models of `rewards` under root; returns the reward_options of each."""
    root, options = Path(root), {}
    if "aesthetic" in rewards:
        clip = save_clip(root / "clip", size, device=device, dtype=dtype)
        mlp = save_aesthetic_mlp(root / "aesthetic_mlp.safetensors", size)
        options["aesthetic"] = f"clip_model={clip},mlp_weights={mlp}"
    if "llava_bertscore" in rewards:
        llava = save_llava(root / "llava", size, device=device, dtype=dtype)
        bert = save_roberta(root / "roberta", size, device=device, dtype=dtype)
        options["llava_bertscore"] = f"vlm_model={llava},bert_model={bert},bert_layers={SHAPES[size]['bert_layers']}"
    return options


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to save the models in")
    parser.add_argument("--full-size", action="store_true",
                        help="the paper's architectures (about 15 GB in bf16; built on the GPU when there is one)")
    args = parser.parse_args(argv)
    size = "full" if args.full_size else "tiny"
    full_on_gpu = args.full_size and torch.cuda.is_available()
    options = save_reward_models(args.out, size, device="cuda" if full_on_gpu else "cpu",
                                 dtype=torch.bfloat16 if args.full_size else torch.float32)
    for reward, reward_options in options.items():
        print(f"reward={reward} reward_options={reward_options}")


if __name__ == "__main__":
    main()
