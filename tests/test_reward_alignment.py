"""The llava_bertscore reward on a tiny random LLaVA and RoBERTa saved by the tests and loaded through
from_pretrained, and its OpenAI-compatible vlm_endpoint mode against a loopback chat-completions server."""
import base64
import io
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

import ddpo_fast.train as train
from ddpo_fast import rewards
from ddpo_fast.rewards import random_models
from ddpo_fast.rewards.alignment import DEFAULT_QUESTION, known_bert_layers
from train_helpers import TINY, metrics

BERT_LAYERS = 2
PROMPTS = ["a cat riding a bike", "a dog playing chess", "a horse washing the dishes", "a cow riding a bike", "a bird"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignment")
    return {"llava": random_models.save_llava(root / "llava"), "empty": random_models.save_llava(root / "empty", empty_answers=True),
            "bert": random_models.save_roberta(root / "roberta")}


def _images(n=5, h=40, w=56, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _build(models, vlm="llava", **options):
    return rewards.build("llava_bertscore", vlm_model=str(models[vlm]), bert_model=str(models["bert"]),
                         bert_layers=str(BERT_LAYERS), max_new_tokens="6", **options)


# ---- plain recomputations ------------------------------------------------------------------------
def _plain_answers(llava_dir, images, question=DEFAULT_QUESTION, max_new_tokens=6):
    """Greedy decoding one image at a time with full forward passes (no generate(), no cache, no padding)."""
    processor = AutoProcessor.from_pretrained(llava_dir)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    eos = processor.tokenizer.eos_token_id
    answers = []
    for image in images:
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        ids, new = inputs["input_ids"], []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"]).logits
                token = int(logits[0, -1].argmax())
                if token == eos:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return answers


def _plain_bertscore(bert_dir, candidates, references, layers=BERT_LAYERS):
    """BERTScore from its definition: cosine similarities of layer-`layers` token embeddings, greedy
    matching; recall averages over the reference's tokens, precision over the candidate's, special tokens
    excluded from the averages (bert-score's idf weights are 0 for them)."""
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    model = AutoModel.from_pretrained(bert_dir).eval()

    def embed(text):
        ids = tokenizer.encode(text, add_special_tokens=True, add_prefix_space=True)
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layers][0]
        weight = torch.tensor([0.0 if i in (tokenizer.cls_token_id, tokenizer.sep_token_id) else 1.0 for i in ids])
        return h / h.norm(dim=-1, keepdim=True), weight

    p, r = [], []
    for cand, ref in zip(candidates, references):
        (hc, wc), (hr, wr) = embed(cand), embed(ref)
        sim = hc @ hr.T
        p.append(float((sim.max(dim=1).values * wc).sum() / wc.sum()))
        r.append(float((sim.max(dim=0).values * wr).sum() / wr.sum()))
    p, r = torch.tensor(p), torch.tensor(r)
    return p, r, 2 * p * r / (p + r)


# ---- the in-process reward -----------------------------------------------------------------------
def test_answers_and_scores_equal_plain_recomputation(models):
    images = _images()
    fn = _build(models, batch_size="2")  # batches of 2, 2 and 1
    scores, info = fn(images, PROMPTS, [{}] * 5)
    answers = _plain_answers(models["llava"], images)
    assert info["answers"] == answers and all(answers)  # random weights, but words: non-empty answers
    p, r, f = _plain_bertscore(models["bert"], answers, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert torch.allclose(scores, r, atol=1e-5)  # recall by default
    assert info["bertscore_precision"] == pytest.approx(float(p.mean()), abs=1e-5)
    assert info["bertscore_f1"] == pytest.approx(float(f.mean()), abs=1e-5)
    assert info["empty_answer_fraction"] == 0
    again, info_again = fn(images, PROMPTS, [{}] * 5)  # deterministic
    assert torch.equal(scores, again) and info_again["answers"] == answers
    for score, expected in (("precision", p), ("f1", f)):
        assert torch.allclose(_build(models, score=score)(images, PROMPTS, [{}] * 5)[0], expected, atol=1e-5)


def test_bertscore_ranks_a_matching_answer_first(models):
    fn = _build(models)
    same = fn.bertscore(["a cat riding a bike"], ["a cat riding a bike"])
    other = fn.bertscore(["dolphin shark bee"], ["a cat riding a bike"])
    assert same["recall"][0] == pytest.approx(1.0, abs=1e-5) and other["recall"][0] < same["recall"][0] - 0.01


def test_empty_answers_are_counted_and_score_zero(models):
    scores, info = _build(models, vlm="empty")(_images(3), PROMPTS[:3], [{}] * 3)
    assert info["answers"] == ["", "", ""] and info["empty_answer_fraction"] == 1
    assert torch.equal(scores, torch.zeros(3))
    fn = _build(models)
    mixed = fn.bertscore(["a cat", "", "  "], PROMPTS[:3])  # a blank answer is empty too
    assert mixed["recall"][0] > 0 and mixed["recall"][1] == 0 and mixed["recall"][2] == 0


def test_weighted_sum_keeps_the_answers_per_image(models):
    images = _images(3)
    fn = rewards.build("llava_bertscore:1.0,jpeg_compressibility:0.01", vlm_model=str(models["llava"]),
                       bert_model=str(models["bert"]), bert_layers=BERT_LAYERS, max_new_tokens=6)
    r, info = fn(images, PROMPTS[:3], [{}] * 3)
    alone, alone_info = _build(models)(images, PROMPTS[:3], [{}] * 3)
    sizes = torch.from_numpy(rewards.jpeg_sizes_kb(images))
    assert torch.allclose(r, alone - 0.01 * sizes, atol=1e-5)
    assert info["llava_bertscore/answers"] == alone_info["answers"]


def test_bad_inputs_are_named(models):
    fn = _build(models)
    with pytest.raises(ValueError, match="uint8"):
        fn(torch.zeros(2, 3, 8, 8), PROMPTS[:2], [{}] * 2)
    with pytest.raises(ValueError, match="one prompt per image: 1 prompts, 2 images"):
        fn(_images(2), PROMPTS[:1], [{}] * 2)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        fn(_images(2), ["a cat", " "], [{}] * 2)


@pytest.mark.parametrize("options, words", [
    ({"bert_model": "BERT"}, ["vlm_model is required"]),
    ({"vlm_model": "VLM"}, ["bert_model is required"]),
    ({"vlm_model": "/nonexistent/llava", "bert_model": "BERT"}, ["vlm_model=", "not a directory"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "bert_layers": ""}, ["is not one bert-score knows", "bert_layers=N"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "score": "accuracy"}, ["score must be one of recall, precision, f1"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "max_new_tokens": "0"}, ["max_new_tokens must be >= 1"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "dtype": "int8"}, ["dtype must be fp32 or bf16 or fp16"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "question": " "}, ["question must not be empty"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "vlm_endpoint": "localhost:8000"}, ["vlm_endpoint=", "http(s) URL"]),
    ({"bert_model": "BERT", "vlm_endpoint": "http://127.0.0.1:1/v1"}, ["vlm_model is required with vlm_endpoint"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "timeout": "0"}, ["timeout must be > 0"]),
    ({"vlm_model": "VLM", "bert_model": "BERT", "vlm_modle": "x"}, ["unknown reward option 'vlm_modle'"]),
])
def test_bad_options_are_named(models, options, words):
    options = {k: {"VLM": str(models["llava"]), "BERT": str(models["bert"])}.get(v, v) for k, v in options.items()}
    options.setdefault("bert_layers", BERT_LAYERS)
    if options["bert_layers"] == "":
        del options["bert_layers"]
    with pytest.raises(ValueError) as info:
        rewards.check("llava_bertscore", **options)
    for word in words:
        assert word in str(info.value)


def test_known_bert_layers_come_from_bert_score():
    assert known_bert_layers("roberta-large") == 17
    assert known_bert_layers("/models/roberta-large/") == 17  # a local copy named after the model
    assert known_bert_layers("/models/microsoft/deberta-xlarge-mnli") == 40
    assert known_bert_layers("/models/my-bert") is None


# ---- the vlm_endpoint mode ------------------------------------------------------------------------
class FakeChatServer:
    """A loopback OpenAI-compatible chat-completions server: answers by the image's mean brightness
    (dark images get an empty answer), records the requests, and can fail the first requests with 503."""

    def __init__(self, fail_first: int = 0):
        self.requests, self.fail_first = [], fail_first
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, dict(self.headers), body))
                if len(owner.requests) <= owner.fail_first:
                    self.send_response(503)
                    self.end_headers()
                    return
                url = body["messages"][0]["content"][0]["image_url"]["url"]
                image = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
                answer = "" if image.mean() < 100 else "a cat riding a bike"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_vlm_endpoint_sends_each_image_and_scores_the_answers(models, monkeypatch):
    monkeypatch.setenv("TEST_VLM_KEY", "secret")
    server = FakeChatServer()
    try:
        images = _images(4)
        images[1] = 10  # dark: the server answers nothing
        fn = rewards.build("llava_bertscore", vlm_endpoint=server.url, vlm_model="llava-hf/llava-1.5-7b-hf",
                           bert_model=str(models["bert"]), bert_layers=BERT_LAYERS, question="Describe it.",
                           api_key_env="TEST_VLM_KEY", max_new_tokens=20)
        scores, info = fn(images, PROMPTS[:4], [{}] * 4)
    finally:
        server.close()
    assert info["answers"] == ["a cat riding a bike", "", "a cat riding a bike", "a cat riding a bike"]
    assert info["empty_answer_fraction"] == 0.25 and scores[1] == 0
    _, expected, _ = _plain_bertscore(models["bert"], ["a cat riding a bike"] * 3, [PROMPTS[i] for i in (0, 2, 3)])
    assert torch.allclose(scores[[0, 2, 3]], expected, atol=1e-5)
    assert len(server.requests) == 4
    sent = []
    for path, headers, body in server.requests:
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer secret"
        assert body["model"] == "llava-hf/llava-1.5-7b-hf" and body["temperature"] == 0 and body["max_tokens"] == 20
        image_part, text_part = body["messages"][0]["content"]
        assert text_part == {"type": "text", "text": "Describe it."}
        png = base64.b64decode(image_part["image_url"]["url"].removeprefix("data:image/png;base64,"))
        sent.append(torch.from_numpy(np.array(Image.open(io.BytesIO(png)))).permute(2, 0, 1))
    # the requests run concurrently, so in any order: each image was sent exactly once, losslessly
    assert sorted(x.flatten().tolist() for x in sent) == sorted(x.flatten().tolist() for x in images)


def test_vlm_endpoint_retries_then_fails_clearly(models):
    server = FakeChatServer(fail_first=2)
    try:
        fn = rewards.build("llava_bertscore", vlm_endpoint=server.url + "/chat/completions", vlm_model="m",
                           bert_model=str(models["bert"]), bert_layers=BERT_LAYERS, concurrency=1, retries=2)
        scores, info = fn(_images(1) // 2 + 128, PROMPTS[:1], [{}])  # two 503s, then an answer
        assert info["answers"] == ["a cat riding a bike"] and len(server.requests) == 3
    finally:
        server.close()
    dead = rewards.build("llava_bertscore", vlm_endpoint=server.url, vlm_model="m", bert_model=str(models["bert"]),
                         bert_layers=BERT_LAYERS, timeout=2, retries=1)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"vlm_endpoint http://127.0.0.1:\d+/v1/chat/completions failed after 2"):
        dead(_images(1), PROMPTS[:1], [{}])
    assert time.perf_counter() - start < 2 * 2 + 2


# ---- the trainer ------------------------------------------------------------------------------------
def test_trainer_runs_with_llava_bertscore_and_saves_the_answers(tmp_path, models, monkeypatch):
    monkeypatch.setenv("DDPO_FAST_NO_PROGRESS", "1")
    run = tmp_path / "run"
    train.main(["--run-dir", str(run), *TINY, "num_epochs=1", "prompts=animal_activities", "reward=llava_bertscore",
                f"reward_options=vlm_model={models['llava']},bert_model={models['bert']},bert_layers=2,"
                "max_new_tokens=4", "reward_device=cpu"])
    (record,) = metrics(run)
    assert math.isfinite(record["reward_mean"]) and 0 < record["reward_mean"] <= 1
    assert record["reward_info/bertscore_recall"] == pytest.approx(record["reward_mean"], abs=1e-5)
    assert record["reward_info/empty_answer_fraction"] == 0
    samples = [json.loads(line) for line in (run / "samples" / "epoch_0000.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["answers"] and s["prompt"] for s in samples)
    assert np.mean([s["reward"] for s in samples]) == pytest.approx(record["reward_mean"], abs=1e-5)


def test_trainer_reward_device_conflict_is_named(tmp_path):
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "reward_device=cpu", "reward=aesthetic",
                             "reward_options=device=cpu"])
    with pytest.raises(train.cfg.ConfigError, match="reward_device='cpu' and reward_options device='cpu'"):
        train.resolve_config(args, 1)
