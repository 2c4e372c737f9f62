"""The reward server (python -m ddpo_fast.rewards.serve) and its client, on real server subprocesses."""
import http.client
import json
import math
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpo_fast import rewards
from ddpo_fast.rewards.client import RemoteReward, RewardServerError, health, start_server
from train_helpers import REPO, env

JPEG = "jpeg_compressibility"
INFO = "test_reward_server:info_reward"  # imported by the server: tests/ is on its PYTHONPATH


# ---- a test reward the server imports ------------------------------------------------------------
def info_reward(images, prompts, metadata):
    """Mean pixel value + metadata["bonus"]; NaN where metadata["nan"]; raises if a prompt is "explode";
    takes at least max(metadata["seconds"]) seconds. info: per-image `answers` naming each image's prompt
    and pixel sum, batch-level `batch_images`."""
    if "explode" in prompts:
        raise RuntimeError("asked to explode")
    time.sleep(max(float(m.get("seconds", 0)) for m in metadata))
    # Pixel sums of these small images are exact in float32, so batching cannot change a reward.
    scores = images.float().mean(dim=(1, 2, 3)) + torch.tensor([float(m.get("bonus", 0)) for m in metadata])
    scores[torch.tensor([bool(m.get("nan", False)) for m in metadata])] = float("nan")
    answers = [f"{p}#{int(image.sum())}" for p, image in zip(prompts, images)]
    return scores, {"answers": answers, "batch_images": len(prompts)}


# ---- helpers --------------------------------------------------------------------------------------
def random_images(n, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def encode(reward, images, prompts, metadata, shape=None):
    """A POST /reward body in the documented wire format, written here independently of the client."""
    header = json.dumps({"reward": reward, "shape": list(images.shape) if shape is None else shape,
                         "prompts": prompts, "metadata": metadata}).encode()
    return struct.pack(">I", len(header)) + header + images.numpy().tobytes()


def raw(url, method, path, body=None, headers=None):
    """One request with plain http.client: (status, decoded JSON answer)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        if headers is None:
            conn.request(method, path, body=body)
        else:  # exactly these headers (e.g. no Content-Length)
            conn.putrequest(method, path)
            for key, value in headers.items():
                conn.putheader(key, value)
            conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def serve(reward, log_dir, **kwargs):
    return start_server(reward, {}, startup_timeout=60, env=env(), log_path=log_dir / "server.log", **kwargs)


@pytest.fixture(scope="module")
def jpeg_server(tmp_path_factory):
    with serve(JPEG, tmp_path_factory.mktemp("jpeg")) as server:
        yield server


@pytest.fixture(scope="module")
def info_server(tmp_path_factory):
    # Requests arriving while a call runs (or within the batch wait) join the next call.
    with serve(INFO, tmp_path_factory.mktemp("info"), max_batch=16, batch_wait_ms=200) as server:
        yield server


@pytest.fixture
def own_server(tmp_path):
    """A server of its own, for the tests that stop or kill it."""
    server = serve(JPEG, tmp_path)
    yield server
    server.close()


# ---- results ------------------------------------------------------------------------------------------
def test_served_rewards_equal_in_process(jpeg_server):
    images = random_images(5)
    images[1] = 128  # a flat image: a very different JPEG size
    prompts, metadata = [f"p{i}" for i in range(5)], [{"i": i} for i in range(5)]
    expected, expected_info = rewards._checked_call(rewards.build(JPEG), images, prompts, metadata)
    remote = RemoteReward(jpeg_server.url, JPEG)
    assert remote.__name__ == f"{JPEG}@{jpeg_server.url}"
    got, info = remote(images, prompts, metadata)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got, expected)
    assert info == pytest.approx(expected_info)
    status = health(jpeg_server.url)
    assert status["reward"] == JPEG and status["ready"] is True and status["requests"] >= 1


def test_nan_reward_and_numpy_metadata_survive(info_server):
    images = random_images(3, seed=1)
    metadata = [{"bonus": np.float32(0.5)}, {"nan": np.bool_(True)},
                {"bonus": np.array([2.0]).sum(), "v": np.arange(2)}]
    got, info = RemoteReward(info_server.url, INFO)(images, ["a", "b", "c"], metadata)
    means = images.float().mean(dim=(1, 2, 3))
    assert got[0] == means[0] + 0.5 and math.isnan(got[1]) and got[2] == means[2] + 2.0
    assert info["answers"] == [f"{p}#{int(im.sum())}" for p, im in zip("abc", images)]


def test_concurrent_requests_are_batched_and_split_back(info_server):
    remote = RemoteReward(info_server.url, INFO)
    sizes = [(1, 8, 8), (2, 8, 8), (3, 8, 8), (1, 8, 16), (2, 8, 16), (3, 8, 8), (1, 8, 16), (2, 8, 8)]
    jobs = []
    for k, (n, h, w) in enumerate(sizes):
        images = random_images(n, h, w, seed=10 + k)
        prompts = [f"client{k}-image{i}" for i in range(n)]
        # each call takes 0.5 s: all requests arrive while the first one runs, and the rest are batched
        jobs.append((images, prompts, [{"bonus": k, "seconds": 0.5} for _ in range(n)]))
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def client(k):
        try:
            barrier.wait()
            results[k] = remote(*jobs[k])
        except Exception as e:  # reported below
            errors.append(e)

    before = health(info_server.url)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = health(info_server.url)
    assert not errors, errors
    for (images, prompts, metadata), (got, info) in zip(jobs, results):
        expected, expected_info = info_reward(images, prompts, metadata)
        assert torch.equal(got, expected)
        assert info["answers"] == expected_info["answers"]  # this request's slice, in order
        assert info["batch_images"] >= len(prompts)
    assert after["requests"] - before["requests"] == len(jobs)
    calls = after["calls"] - before["calls"]
    assert 2 <= calls < len(jobs)  # batched, and the two image sizes never share a call
    assert any(info["batch_images"] > len(images) for (images, _, _), (_, info) in zip(jobs, results))


def test_request_larger_than_max_batch_runs_alone(info_server):
    images = random_images(20, seed=3)  # max_batch is 16
    prompts, metadata = [f"big{i}" for i in range(20)], [{} for _ in range(20)]
    got, info = RemoteReward(info_server.url, INFO)(images, prompts, metadata)
    expected, expected_info = info_reward(images, prompts, metadata)
    assert torch.equal(got, expected)
    assert info == {"answers": expected_info["answers"], "batch_images": 20}


# ---- errors ---------------------------------------------------------------------------------------------
def _good():
    return random_images(2, seed=4), ["x", "y"], [{}, {}]


def _cases():
    images, prompts, metadata = _good()
    body = encode(JPEG, images, prompts, metadata)
    header_length = struct.unpack(">I", body[:4])[0]
    return {
        "garbage": (b"\x00\x00\xff\xffgarbage!", "too short"),
        "tiny": (b"ab", "too short"),
        "truncated": (body[:4 + header_length // 2], "too short"),
        "not json": (struct.pack(">I", 9) + b"not json{" + images.numpy().tobytes(), "not UTF-8 JSON"),
        "not an object": (struct.pack(">I", 2) + b"[]", "JSON object"),
        "missing fields": (struct.pack(">I", 2) + b"{}", "lacks field(s) reward, shape, prompts, metadata"),
        "2 channels": (encode(JPEG, images[:, :2], prompts, metadata), "shape must be [N, 3, H, W]"),
        "3-D": (encode(JPEG, images[0], ["x"], [{}]), "shape must be [N, 3, H, W]"),
        "zero size": (encode(JPEG, images[:0], [], []), "shape must be [N, 3, H, W]"),
        "byte count": (body[:-5], "image data has"),
        "extra bytes": (body + b"12345", "image data has"),
        "prompts length": (encode(JPEG, images, ["x"], metadata), "prompts must be a list of 2 strings"),
        "metadata length": (encode(JPEG, images, prompts, [{}]), "metadata must be a list of 2"),
        "unknown reward": (encode("aesthetic", images, prompts, metadata), f"serves reward {JPEG!r}, not 'aesthetic'"),
    }


def test_malformed_requests_get_400_and_the_server_keeps_serving(jpeg_server):
    for name, (body, message) in _cases().items():
        status, answer = raw(jpeg_server.url, "POST", "/reward", body)
        assert status == 400, name
        assert message in answer["error"], (name, answer)
    status, answer = raw(jpeg_server.url, "POST", "/reward", headers={})
    assert status == 400 and "Content-Length" in answer["error"]
    status, answer = raw(jpeg_server.url, "POST", "/reward", headers={"Content-Length": "-5"})
    assert status == 400 and "Content-Length" in answer["error"]
    images, prompts, metadata = _good()
    status, answer = raw(jpeg_server.url, "POST", "/reward", encode(JPEG, images, prompts, metadata))
    assert status == 200
    assert answer["rewards"] == rewards.build(JPEG)(images, prompts, metadata)[0].tolist()


def test_unknown_path_404(jpeg_server):
    assert raw(jpeg_server.url, "GET", "/nope")[0] == 404
    assert raw(jpeg_server.url, "POST", "/nope", b"xyz")[0] == 404


def test_400_is_a_value_error_for_the_client(jpeg_server):
    with pytest.raises(ValueError, match="serves reward 'jpeg_compressibility', not 'jpeg_incompressibility'"):
        RemoteReward(jpeg_server.url, "jpeg_incompressibility")(*_good())


def test_reward_raising_is_a_500_and_the_server_keeps_serving(info_server):
    images = random_images(2, seed=5)
    status, answer = raw(info_server.url, "POST", "/reward", encode(INFO, images, ["explode", "x"], [{}, {}]))
    assert status == 500
    assert answer["error"].startswith(f"reward {INFO} raised RuntimeError: asked to explode (at ")
    remote = RemoteReward(info_server.url, INFO, retries=0)
    with pytest.raises(RewardServerError, match="asked to explode"):
        remote(images, ["explode", "x"], [{}, {}])
    got, _ = remote(images, ["a", "b"], [{}, {}])
    assert torch.equal(got, images.float().mean(dim=(1, 2, 3)))


# ---- the batcher, in process: the worker's batches made deterministic ----------------------------
def _run_batcher(jobs, max_batch=16):
    """Runs `jobs` through a Batcher of info_reward, all queued before it gathers its first call;
    returns (the image count of each reward call, each job's answer or exception)."""
    from ddpo_fast.rewards.serve import Batcher

    calls = []

    def spy(images, prompts, metadata):
        calls.append(len(prompts))
        return info_reward(images, prompts, metadata)

    batcher = Batcher(spy, "spy", max_batch=max_batch, wait_s=0.3, start=False)
    for job in jobs:  # all queued before the worker starts: its first call sees them all
        batcher.queue.put(job)
    batcher.start()
    answers = []
    for job in jobs:
        try:
            answers.append(json.loads(job.future.result(timeout=20)))
        except Exception as e:
            answers.append(e)
    assert batcher.calls == len(calls) and batcher.requests == len(jobs)
    return calls, answers


def test_batcher_groups_by_size_and_max_batch():
    from ddpo_fast.rewards.serve import Job

    shapes = [(2, 8, 8), (1, 8, 16), (15, 8, 8), (3, 8, 8)]  # 2 + 15 > max_batch 16: the 15 waits
    jobs = [Job(random_images(n, h, w, seed=k), [f"j{k}"] * n, [{}] * n) for k, (n, h, w) in enumerate(shapes)]
    calls, answers = _run_batcher(jobs)
    assert sorted(calls) == [1, 5, 15]
    for job, answer in zip(jobs, answers):
        expected, info = info_reward(job.images, job.prompts, job.metadata)
        assert answer["rewards"] == expected.tolist() and answer["info"]["answers"] == info["answers"]


def test_a_failing_request_fails_alone_not_its_whole_batch():
    from ddpo_fast.rewards.serve import Job, RewardFailed

    jobs = [Job(random_images(1, seed=k), [p], [{}]) for k, p in enumerate(["ok0", "explode", "ok2", "ok3"])]
    calls, answers = _run_batcher(jobs)
    assert calls == [4, 1, 1, 1, 1]  # the batch, then each request alone
    assert isinstance(answers[1], RewardFailed)
    assert str(answers[1]).startswith("reward spy raised RuntimeError: asked to explode (at ")
    for k in (0, 2, 3):
        assert answers[k]["rewards"] == jobs[k].images.float().mean(dim=(1, 2, 3)).tolist()
        assert answers[k]["info"] == {"answers": [f"ok{k}#{int(jobs[k].images.sum())}"], "batch_images": 1}


def test_killed_server_raises_within_the_time_limit(own_server):
    remote = RemoteReward(own_server.url, JPEG, timeout=2.0, retries=2)
    images, prompts, metadata = _good()
    assert remote(images, prompts, metadata)[0].shape == (2,)
    own_server.process.send_signal(signal.SIGKILL)
    own_server.process.wait(10)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="after 3 attempts.*is it running"):
        remote(images, prompts, metadata)
    assert time.monotonic() - start < 3 * 2.0 + 0.5 + 1.0 + 1.0
    own_server.close()
    own_server.close()  # idempotent


def test_hung_server_times_out(own_server):
    remote = RemoteReward(own_server.url, JPEG, timeout=1.0, retries=1)
    own_server.process.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(RewardServerError, match=r"did not answer reward jpeg_compressibility within 1 s"):
            remote(*_good())
        elapsed = time.monotonic() - start
    finally:
        own_server.process.send_signal(signal.SIGCONT)
    assert 0.9 < elapsed < 1.0 + 1.0  # one timeout: a request that may be in progress is not resent
    assert health(own_server.url)["reward"] == JPEG  # it serves again once continued


def test_a_slow_answer_is_an_error_and_is_computed_once(info_server):
    before = health(info_server.url)
    images = random_images(2, seed=7)
    with pytest.raises(RewardServerError, match="within 0.5 s"):
        RemoteReward(info_server.url, INFO, timeout=0.5, retries=2)(images, ["a", "b"], [{"seconds": 1.5}] * 2)
    deadline = time.monotonic() + 10
    while health(info_server.url)["requests"] == before["requests"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the server finishes the abandoned request
    time.sleep(0.5)
    after = health(info_server.url)
    assert after["requests"] - before["requests"] == 1 and after["calls"] - before["calls"] == 1


# ---- starting and stopping ----------------------------------------------------------------------
def test_bad_option_fails_start_with_the_servers_message(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RewardServerError, match="exited with code 2") as caught:
        start_server(JPEG, {"quality": "50"}, startup_timeout=60, log_path=log, env=env())
    assert "unknown reward option 'quality'" in str(caught.value)
    assert "unknown reward option 'quality'" in log.read_text()


def test_server_exits_when_its_parent_is_gone(tmp_path):
    parent = subprocess.Popen(["sleep", "60"])
    port_file, log = tmp_path / "port", open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "ddpo_fast.rewards.serve", "--reward", JPEG,
                               "--port-file", str(port_file), "--parent-pid", str(parent.pid)],
                              cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.05)
        assert health(f"http://127.0.0.1:{int(port_file.read_text())}")["ready"]
        parent.kill()
        parent.wait()
        server.wait(timeout=10)  # polled every 2 s
        output = (tmp_path / "server.log").read_text()
        assert f"parent process {parent.pid} is gone" in output
        assert "ddpo_fast reward server: jpeg_compressibility on http://127.0.0.1:" in output
    finally:
        for process in (parent, server):
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()


# ---- client argument errors ------------------------------------------------------------------------
def test_client_argument_errors_name_the_argument(monkeypatch):
    remote = RemoteReward("http://127.0.0.1:9", JPEG)  # never reached: the arguments fail first
    images, prompts, metadata = _good()
    with pytest.raises(ValueError, match="^images must be a uint8"):
        remote(images.float(), prompts, metadata)
    with pytest.raises(ValueError, match="^images must be a uint8"):
        remote(images[:, :2], prompts, metadata)
    with pytest.raises(ValueError, match=r"^prompts must be a list of 2 strings .*got 1 prompts"):
        remote(images, ["x"], metadata)
    with pytest.raises(ValueError, match=r"^prompts\[1\] must be a string"):
        remote(images, ["x", 3], metadata)
    with pytest.raises(ValueError, match=r"^metadata must be a list of 2"):
        remote(images, prompts, [{}])
    with pytest.raises(TypeError, match=r"^metadata\[1\]\['f'\] is a object"):
        remote(images, prompts, [{}, {"f": object()}])
    with pytest.raises(ValueError, match="^url="):
        RemoteReward("localhost:8000", JPEG)
    with pytest.raises(ValueError, match="^timeout must"):
        RemoteReward("http://127.0.0.1:9", JPEG, timeout=0)


# ---- request size ------------------------------------------------------------------------------------
def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_memory_follows_the_bytes_received_not_the_declared_length(tmp_path):
    """Idle connections declaring 512 MiB bodies: the server allocated them up front before (1 GiB here)."""
    with serve(JPEG, tmp_path, max_request_bytes=1 << 30) as server:
        host, port = server.url.removeprefix("http://").split(":")
        before = _rss_bytes(server.process.pid)
        idle = []
        for _ in range(2):
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /reward HTTP/1.1\r\nHost: x\r\nContent-Length: 536870912\r\n\r\n" + b"\0" * 1000)
            idle.append(sock)
        time.sleep(1.0)  # the handler threads have read the headers and what was sent
        grown = _rss_bytes(server.process.pid) - before
        for sock in idle:
            sock.close()
        assert grown < 64 << 20, f"the server grew by {grown >> 20} MiB for two idle 512 MiB declarations"
        images, prompts, metadata = _good()  # and it still serves
        assert server.remote()(images, prompts, metadata)[0].shape == (2,)


def test_request_above_the_cap_gets_413_and_a_clear_client_error(tmp_path):
    images, prompts, metadata = _good()
    small = len(encode(JPEG, images, prompts, metadata))
    with serve(JPEG, tmp_path, max_request_bytes=small) as server:
        status, answer = raw(server.url, "POST", "/reward", encode(JPEG, images, prompts, metadata))
        assert status == 200
        big = random_images(3)
        status, answer = raw(server.url, "POST", "/reward", encode(JPEG, big, ["a"] * 3, [{}] * 3))
        assert status == 413 and f"({small} bytes, --max-request-bytes)" in answer["error"]
        with pytest.raises(ValueError, match=r"refused the request: request of \d+ bytes is larger than this server"):
            server.remote()(big, ["a"] * 3, [{}] * 3)
        assert server.remote()(images, prompts, metadata)[0].shape == (2,)  # still serving


def test_default_cap_fits_max_batch_images_of_1024():
    from ddpo_fast.rewards.serve import build_parser, default_max_request_bytes

    assert default_max_request_bytes(64) == 64 * 3 * 1024 * 1024 + (16 << 20)
    assert build_parser().parse_args(["--reward", JPEG]).max_request_bytes is None  # main() fills the default

