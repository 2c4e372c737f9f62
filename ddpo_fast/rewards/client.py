"""Client of the reward server (ddpo_fast.rewards.serve; its docstring has the wire format).

    from ddpo_fast.rewards.client import RemoteReward, start_server
    with start_server("aesthetic", {"clip_model": "...", "mlp_weights": "..."}, device="cuda:1") as server:
        fn = RemoteReward(server.url, "aesthetic")
        scores, info = fn(images, prompts, metadata)  # a reward function like any other

A call that gets no answer within `timeout` seconds raises RewardServerError at once; a refused
connection (a dead server) is retried `retries` times over a few seconds first. Either way the
trainer gets an error instead of stalling.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
import torch

import ddpo_fast
from ddpo_fast.rewards import RewardError

HEADER_LENGTH_BYTES = 4  # the body starts with the header length, big-endian
BACKOFF_S = 0.5  # before the first retry; doubled for each further one


class RewardServerError(RewardError):
    """The reward server could not be reached or started, did not answer in time, or its reward raised."""


# ---- requests -------------------------------------------------------------------------------------
def _address(url: str) -> tuple[str, int]:
    """(host, port) of an http://HOST:PORT url; ValueError naming url otherwise."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 80
    except ValueError as e:
        raise ValueError(f"url={url!r}: {e}") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"url={url!r}: expected http://HOST:PORT (the reward server's address)")
    return parts.hostname, port


def _exchange(host: str, port: int, method: str, path: str, chunks: list, timeout: float) -> tuple[int, bytes]:
    """One HTTP request; the whole of it (connect, send, answer) takes about `timeout` seconds at most."""
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, path)
        if chunks:
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(sum(len(c) for c in chunks)))
        conn.endheaders()  # connects
        for chunk in chunks:
            _time_left(conn, deadline)
            conn.send(chunk)
        _time_left(conn, deadline)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _time_left(conn: http.client.HTTPConnection, deadline: float) -> None:
    """Gives the socket what is left of the deadline (a socket timeout is per operation, not overall)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    conn.sock.settimeout(left)


def _error_of(data: bytes) -> str:
    """The server's {"error": ...} message, or the start of whatever it sent."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return repr(data[:200])


def health(url: str, timeout: float = 5.0) -> dict:
    """The server's GET /health answer: {"reward", "ready", "requests", "calls"}; RewardServerError if none."""
    host, port = _address(url)
    try:
        status, data = _exchange(host, port, "GET", "/health", [], timeout)
        if status == 200:
            return json.loads(data)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise RewardServerError(f"reward server {url} did not answer /health: {type(e).__name__}: {e}") from None
    raise RewardServerError(f"reward server {url} answered /health with {status}: {_error_of(data)}")


def _plain(value, where: str):
    """`value` as JSON types (numpy and torch values via .tolist()); TypeError naming `where` otherwise."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        return _plain(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; the reward server needs string keys")
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}, which cannot be sent to the reward server "
                    "(JSON types, numpy and torch values only)")


def _check_arguments(images, prompts, metadata) -> tuple[list, list]:
    """Validates a reward call's arguments; returns prompts and metadata as JSON-ready lists."""
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3):
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {got}")
    if images.numel() == 0:
        raise ValueError(f"images must hold at least one non-empty image, got shape {tuple(images.shape)}")
    n = images.shape[0]
    if not (isinstance(prompts, (list, tuple)) and len(prompts) == n):
        got = f"{len(prompts)} prompts" if isinstance(prompts, (list, tuple)) else type(prompts).__name__
        raise ValueError(f"prompts must be a list of {n} strings (one per image), got {got}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    if not (isinstance(metadata, (list, tuple)) and len(metadata) == n):
        got = f"{len(metadata)} entries" if isinstance(metadata, (list, tuple)) else type(metadata).__name__
        raise ValueError(f"metadata must be a list of {n} dicts (one per image), got {got}")
    for i, m in enumerate(metadata):
        if not isinstance(m, dict):
            raise ValueError(f"metadata[{i}] must be a dict, got {type(m).__name__}")
    return list(prompts), [_plain(m, f"metadata[{i}]") for i, m in enumerate(metadata)]


class RemoteReward:
    """A reward function computed by a reward server: `RemoteReward(url, reward)(images, prompts, metadata)`.

    `reward` is the spec the server serves (it refuses another). A request that gets no answer within
    `timeout` seconds is a RewardServerError (not retried: the server may still be computing it); a
    refused or reset connection or a 503 is retried `retries` more times (after 0.5 s, 1 s, 2 s, ...),
    then RewardServerError. A 400 (bad request) or 413 (too large) raises ValueError and a 500 (the
    reward raised) RewardServerError, both with the server's message and without retrying.
    """

    def __init__(self, url: str, reward: str, timeout: float = 300.0, retries: int = 2):
        self.url = url.rstrip("/")
        self.host, self.port = _address(self.url)
        if not (isinstance(reward, str) and reward):
            raise ValueError(f"reward must be the reward spec the server serves, got {reward!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.reward, self.timeout, self.retries = reward, float(timeout), retries
        self.__name__ = f"{reward}@{self.url}"
        self.thread_safe = True  # each call is its own HTTP request; the server batches concurrent ones

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list) -> tuple[torch.Tensor, dict]:
        prompts, metadata = _check_arguments(images, prompts, metadata)
        header = json.dumps({"reward": self.reward, "shape": list(images.shape), "prompts": prompts,
                             "metadata": metadata}).encode()
        pixels = images.detach().cpu().contiguous().numpy().reshape(-1)
        body = [len(header).to_bytes(HEADER_LENGTH_BYTES, "big") + header, memoryview(pixels)]
        status, data = self._post(body)
        if status in (400, 413):
            raise ValueError(f"reward server {self.url} refused the request: {_error_of(data)}")
        if status != 200:
            raise RewardServerError(f"reward server {self.url} answered {status}: {_error_of(data)}")
        try:
            answer = json.loads(data)  # NaN and Infinity parse back as floats
            scores, info = answer["rewards"], answer["info"]
        except (ValueError, KeyError, TypeError):
            raise RewardServerError(f"reward server {self.url} sent a malformed answer: {data[:200]!r}") from None
        if not (isinstance(scores, list) and len(scores) == len(prompts) and isinstance(info, dict)):
            raise RewardServerError(f"reward server {self.url} answered {_describe(scores)} rewards for "
                                    f"{len(prompts)} images")
        return torch.tensor(scores, dtype=torch.float32), info

    def _post(self, chunks: list) -> tuple[int, bytes]:
        """POST /reward with retries; (status, body) of the first answer that is not a 503."""
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                status, data = _exchange(self.host, self.port, "POST", "/reward", chunks, self.timeout)
            except TimeoutError:  # not retried: the server may still be computing it, and would compute it again
                raise RewardServerError(
                    f"reward server {self.url} did not answer reward {self.reward} within {self.timeout:g} s "
                    "(the timeout); is it hung or overloaded? See its log") from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short
                last = f"{type(e).__name__}: {e}"
                continue
            if status != 503:
                return status, data
            last = f"503 {_error_of(data)}"
        raise RewardServerError(
            f"reward server {self.url} gave no answer for reward {self.reward} after {attempts} attempts "
            f"({self.timeout:g} s timeout each): {last}; is it running? Start one with "
            f"`python -m ddpo_fast.rewards.serve --reward {self.reward}`, or see its log")


def _describe(value) -> str:
    return str(len(value)) if isinstance(value, list) else type(value).__name__


# ---- a server subprocess ------------------------------------------------------------------------------
class RewardServer:
    """A reward server subprocess (from `start_server`): `.url`, `.process`, `.log_path`; `close()` stops it."""

    def __init__(self, reward: str, url: str, process: subprocess.Popen, log_path: Path, log_file):
        self.reward, self.url, self.process, self.log_path = reward, url, process, log_path
        self._log_file = log_file

    def remote(self, timeout: float = 300.0, retries: int = 2) -> RemoteReward:
        """A RemoteReward calling this server."""
        return RemoteReward(self.url, self.reward, timeout=timeout, retries=retries)

    def close(self) -> None:
        """SIGTERM, 10 s to exit, then SIGKILL. Safe to call more than once."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()

    def __enter__(self) -> RewardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RewardServer({self.reward!r}, url={self.url!r}, pid={self.process.pid})"


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read the log: {e})"


def start_server(reward: str, options: dict[str, str] | None = None, device: str | None = None, *,
                 startup_timeout: float = 600.0, log_path: str | Path | None = None, max_batch: int = 64,
                 batch_wait_ms: float = 5.0, max_request_bytes: int | None = None,
                 env: dict[str, str] | None = None) -> RewardServer:
    """Starts `python -m ddpo_fast.rewards.serve` on a free local port and waits until it is ready.

    The server exits by itself when this process is gone (--parent-pid). Its output goes to `log_path`
    (appended; a new temporary file if None). `env` adds environment variables for it. Raises
    RewardServerError with the end of its log if it exits first (e.g. a bad option) or is not ready
    within startup_timeout seconds (it is then killed).
    """
    options = dict(options or {})
    for key, value in options.items():
        if "," in str(value) or "=" in str(key) or "," in str(key):
            raise ValueError(f"options[{key!r}]={value!r}: keys and values cannot contain ',' (nor keys '=')")
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="ddpo_fast_reward_server_", suffix=".log")
        os.close(fd)
    log_path = Path(log_path)
    workdir = Path(tempfile.mkdtemp(prefix="ddpo_fast_reward_"))
    port_file = workdir / "port"
    cmd = [sys.executable, "-m", "ddpo_fast.rewards.serve", f"--reward={reward}", "--port=0",
           f"--port-file={port_file}", f"--parent-pid={os.getpid()}", f"--max-batch={max_batch}",
           f"--batch-wait-ms={batch_wait_ms}"]
    if max_request_bytes is not None:
        cmd.append(f"--max-request-bytes={max_request_bytes}")
    if options:
        cmd.append("--reward-options=" + ",".join(f"{k}={v}" for k, v in options.items()))
    if device is not None:
        cmd.append(f"--device={device}")
    child_env = {**os.environ, **(env or {})}
    root = str(Path(ddpo_fast.__file__).resolve().parent.parent)
    if Path(root).name not in ("site-packages", "dist-packages"):  # a source checkout: make it importable there
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)

    log_file = open(log_path, "ab")
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=child_env)
    server = RewardServer(reward, "", process, log_path, log_file)
    deadline = time.monotonic() + startup_timeout
    try:
        while not port_file.exists():
            if process.poll() is not None:
                raise RewardServerError(f"reward server for {reward} exited with code {process.returncode} before "
                                        f"it was ready; the end of its log {log_path}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RewardServerError(f"reward server for {reward} was not ready after {startup_timeout:g} s "
                                        f"(killed); the end of its log {log_path}:\n{_log_tail(log_path)}")
            time.sleep(0.05)
        server.url = f"http://127.0.0.1:{int(port_file.read_text())}"
    except BaseException:  # also Ctrl-C while waiting: leave no server behind
        if process.poll() is None:
            process.kill()
        server.close()
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return server
