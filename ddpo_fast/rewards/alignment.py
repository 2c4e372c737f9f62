"""The `llava_bertscore` reward: prompt-image alignment.

A vision-language model answers a question about each image (default: "What is happening in this
image?"), and BERTScore (the bert-score package) compares the answer with the image's prompt:
reward = BERTScore recall of the prompt's tokens in the answer by default (precision or f1 with
score=). An answer that is empty after decoding scores 0; the fraction of empty answers is logged
(empty_answer_fraction), and the answers are returned per image in info["answers"] (the trainer saves
them beside the sample grids).

The answers come from either
  - LLaVA in this process: transformers' LlavaForConditionalGeneration and its processor loaded from
    vlm_model (a directory or hub id), batched greedy generation on `device` in `dtype`; or
  - an OpenAI-compatible chat-completions server (vLLM, SGLang, ...) at vlm_endpoint=URL serving the
    model named vlm_model: one request per image (PNG as a data URL, temperature 0), `concurrency`
    requests in flight, so the server batches them. The API key, if any, is read from the environment
    variable named by api_key_env (default OPENAI_API_KEY).
BERTScore runs in this process on `device`: bert_model is a model directory or hub id, bert_layers the
layer whose embeddings are compared (bert-score's tuned value is used for the models it knows, e.g.
17 for roberta-large; other models need bert_layers).

Options: vlm_model (required), bert_model (required), bert_layers, question, score (recall, precision,
f1), max_new_tokens (64), batch_size (images per generate call, 16), device, dtype (fp32, bf16, fp16;
default bf16 on a GPU, fp32 on the CPU), vlm_endpoint, concurrency (16), timeout (seconds per
endpoint request, 120), retries (2), api_key_env.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ddpo_fast.rewards import options as opt

NAME = "llava_bertscore"
DEFAULT_QUESTION = "What is happening in this image?"
SCORES = ("recall", "precision", "f1")
# LLaVA-1.5's conversation format, used when the processor has no chat template.
LLAVA_15_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def known_bert_layers(bert_model: str) -> int | None:
    """bert-score's tuned layer for a model it knows, matched on the id or the directory's name."""
    from bert_score.utils import model2layers

    parts = Path(bert_model.rstrip("/")).parts
    for candidate in (bert_model, "/".join(parts[-2:]), parts[-1] if parts else ""):
        if candidate in model2layers:
            return model2layers[candidate]
    return None


def llava_bertscore_options(vlm_model=None, bert_model=None, bert_layers=None, question=DEFAULT_QUESTION,
                            score="recall", max_new_tokens=64, batch_size=16, device=None, dtype=None,
                            vlm_endpoint=None, concurrency=16, timeout=120, retries=2,
                            api_key_env="OPENAI_API_KEY") -> dict:
    """Validates and converts the options (strings accepted); builds nothing."""
    if importlib.util.find_spec("bert_score") is None:
        raise ValueError(f"{NAME} reward needs the bert-score package: pip install bert-score")
    if vlm_endpoint:
        vlm_endpoint = str(vlm_endpoint).strip()
        if not vlm_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"{NAME} reward: vlm_endpoint={vlm_endpoint!r} must be an http(s) URL, "
                             "e.g. http://127.0.0.1:8000/v1")
        if not vlm_model or not str(vlm_model).strip():
            raise ValueError(f"{NAME} reward: option vlm_model is required with vlm_endpoint (the model name the "
                             "server serves, e.g. llava-hf/llava-1.5-7b-hf)")
        vlm_model = str(vlm_model).strip()
    else:
        vlm_model = opt.model_path(NAME, "vlm_model", vlm_model, "llava-hf/llava-1.5-7b-hf")
    bert_model = opt.model_path(NAME, "bert_model", bert_model, "roberta-large")
    if bert_layers is None or bert_layers == "":
        bert_layers = known_bert_layers(bert_model)
        if bert_layers is None:
            raise ValueError(f"{NAME} reward: bert_model={bert_model!r} is not one bert-score knows the best layer of; "
                             "give bert_layers=N (e.g. 17 for roberta-large)")
    bert_layers = opt.integer(NAME, "bert_layers", bert_layers)
    question = str(question).strip()
    if not question:
        raise ValueError(f"{NAME} reward: question must not be empty")
    device = opt.device(NAME, device)
    if dtype is None or dtype == "":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return {"vlm_model": vlm_model, "bert_model": bert_model, "bert_layers": bert_layers, "question": question,
            "score": opt.choice(NAME, "score", score, SCORES),
            "max_new_tokens": opt.integer(NAME, "max_new_tokens", max_new_tokens),
            "batch_size": opt.integer(NAME, "batch_size", batch_size), "device": device,
            "dtype": opt.dtype(NAME, dtype, ("fp32", "bf16", "fp16")), "vlm_endpoint": vlm_endpoint or None,
            "concurrency": opt.integer(NAME, "concurrency", concurrency),
            "timeout": opt.number(NAME, "timeout", timeout), "retries": opt.integer(NAME, "retries", retries, 0),
            "api_key_env": str(api_key_env)}


class LlavaAnswers:
    """Batched greedy answers of a local LLaVA."""

    def __init__(self, vlm_model: str, question: str, max_new_tokens: int, batch_size: int, device: torch.device,
                 dtype: torch.dtype):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(vlm_model)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.model = LlavaForConditionalGeneration.from_pretrained(vlm_model, dtype=dtype).to(device).eval()
        self.device, self.dtype, self.batch_size, self.max_new_tokens = device, dtype, batch_size, max_new_tokens
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            self.text = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        else:
            self.text = LLAVA_15_PROMPT.format(question=question)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[str]:
        answers = []
        pad = self.processor.tokenizer.pad_token_id
        for chunk in images.cpu().split(self.batch_size):
            inputs = self.processor(images=list(chunk), text=[self.text] * len(chunk), return_tensors="pt",
                                    padding=True).to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=pad if pad is not None else self.processor.tokenizer.eos_token_id)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            answers += [a.strip() for a in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return answers


def png_data_url(image: torch.Tensor) -> str:
    """uint8 (3, H, W) -> data:image/png;base64,..."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class EndpointAnswers:
    """Answers from an OpenAI-compatible chat-completions server, one request per image, concurrently."""

    RETRIED_STATUS = (429, 500, 502, 503, 504)

    def __init__(self, vlm_endpoint: str, vlm_model: str, question: str, max_new_tokens: int, concurrency: int,
                 timeout: float, retries: int, api_key_env: str):
        base = vlm_endpoint.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.question, self.max_new_tokens = vlm_model, question, max_new_tokens
        self.timeout, self.retries = timeout, retries
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vlm")
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get(api_key_env):
            self.headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"

    def request(self, image: torch.Tensor) -> bytes:
        return json.dumps({
            "model": self.model, "temperature": 0, "max_tokens": self.max_new_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                {"type": "text", "text": self.question}]}],
        }).encode()

    def ask(self, image: torch.Tensor) -> str:
        body, error = self.request(image), None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    answer = json.loads(response.read())["choices"][0]["message"].get("content")
                return (answer or "").strip()
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                if e.code not in self.RETRIED_STATUS:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"not a chat-completions answer ({type(e).__name__}: {e})"
                break
        raise RuntimeError(f"{NAME} reward: vlm_endpoint {self.url} failed after {attempt + 1} attempt(s): {error}")

    def __call__(self, images: torch.Tensor) -> list[str]:
        return list(self.pool.map(self.ask, images.cpu()))


class LlavaBertScoreReward:
    """(images, prompts, metadata) -> (BERTScore of each answer against its prompt (N,), info)."""

    __name__ = NAME

    def __init__(self, vlm_model, bert_model, bert_layers, question, score, max_new_tokens, batch_size, device, dtype,
                 vlm_endpoint, concurrency, timeout, retries, api_key_env):
        from bert_score import BERTScorer

        if vlm_endpoint:
            self.answer = EndpointAnswers(vlm_endpoint, vlm_model, question, max_new_tokens, concurrency, timeout,
                                          retries, api_key_env)
        else:
            self.answer = LlavaAnswers(vlm_model, question, max_new_tokens, batch_size, device, dtype)
        self.scorer = BERTScorer(model_type=bert_model, num_layers=bert_layers, device=str(device),
                                 batch_size=max(batch_size, 16))
        self.score_name = score

    def bertscore(self, answers: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
        """precision, recall and f1 (N,) of each answer against its prompt; 0 for an empty answer."""
        scores = {name: torch.zeros(len(answers)) for name in SCORES}
        scored = [i for i, a in enumerate(answers) if a.strip()]
        if scored:  # bert-score cannot take empty strings with transformers 5; they score 0 by definition here
            p, r, f = self.scorer.score([answers[i] for i in scored], [prompts[i] for i in scored])
            for name, values in (("precision", p), ("recall", r), ("f1", f)):
                scores[name][scored] = values.float().cpu()
        return scores

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{NAME} reward needs one prompt per image: {len(prompts)} prompts, {images.shape[0]} images")
        empty_prompts = [i for i, p in enumerate(prompts) if not str(p).strip()]
        if empty_prompts:
            raise ValueError(f"{NAME} reward: prompts {empty_prompts[:5]} are empty; there is nothing to align with")
        answers = self.answer(images)
        scores = self.bertscore(answers, [str(p) for p in prompts])
        info = {f"bertscore_{name}": float(values.mean()) for name, values in scores.items()}
        # a fraction, not a count: the trainer averages batch-level numbers over batches
        info["empty_answer_fraction"] = sum(not a for a in answers) / len(answers)
        info["answers"] = answers
        return scores[self.score_name], info
