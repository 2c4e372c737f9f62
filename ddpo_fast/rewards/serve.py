"""A reward served over HTTP, so that several trainers (or ranks) share one copy of a reward model.

    python -m ddpo_fast.rewards.serve --reward aesthetic \\
        --reward-options clip_model=/models/clip-vit-large-patch14,mlp_weights=/models/laion.pth --port 8000

and in the trainer: `ddpo_fast.rewards.client.RemoteReward("http://127.0.0.1:8000", "aesthetic")`.

Requests that arrive close together are batched: one worker thread runs the reward (models are not
thread-safe), on the requests queued, or being received within --batch-wait-ms, up to --max-batch images
of the same size, and splits the answer back to each request. If a batched call raises, its requests
are run again one by one, so that only the request that makes the reward fail gets the error.

Wire format (stdlib HTTP, no dependencies):
  GET  /health -> 200 {"reward": SPEC, "ready": true, "requests": requests served, "calls": reward calls}
  POST /reward, body: a 4-byte big-endian unsigned header length L, then L bytes of UTF-8 JSON header
       {"reward": SPEC, "shape": [N, 3, H, W], "prompts": [N strings], "metadata": [N dicts]},
       then exactly N*3*H*W bytes: the uint8 images, C-contiguous.
       -> 200 {"rewards": [N floats; NaN and Infinity written as in Python's json], "info": {...}}
          An info value that is a list with one entry per image of the reward call is split back to
          each request; any other value is batch-level (of the whole call) and goes to every request.
       -> 400 {"error": ...} for a malformed request, 413 {"error": ...} for a body above
          --max-request-bytes (bodies are read as they arrive, never allocated from Content-Length),
          500 {"error": ...} if the reward raised,
          404 for an unknown path. The server keeps serving after any of them.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Empty, Queue

import numpy as np
import torch

from ddpo_fast import rewards

HEADER_LENGTH = struct.Struct(">I")
HEADER_FIELDS = ("reward", "shape", "prompts", "metadata")
PARENT_POLL_S = 2.0
READ_CHUNK_BYTES = 1 << 20  # request bodies are read this much at a time
LARGEST_IMAGE = (3, 1024, 1024)  # the default cap fits --max-batch images of this size (SDXL's)
HEADER_ALLOWANCE_BYTES = 16 << 20  # and the JSON header (prompts, metadata)


def default_max_request_bytes(max_batch: int) -> int:
    return max_batch * math.prod(LARGEST_IMAGE) + HEADER_ALLOWANCE_BYTES


class BadRequest(ValueError):
    """A malformed request: answered 400 with this message."""


class TooLarge(ValueError):
    """A request body above --max-request-bytes: answered 413."""

    def __init__(self, length: int, cap: int):
        super().__init__(f"request of {length} bytes is larger than this server takes ({cap} bytes, "
                         "--max-request-bytes); send smaller batches or start the server with a larger cap")
        self.length = length


class RewardFailed(RuntimeError):
    """The reward function raised: answered 500 with this message."""


@dataclass
class Job:
    """One request waiting for the worker; `future` gets the JSON answer (bytes) or RewardFailed."""
    images: torch.Tensor
    prompts: list
    metadata: list
    future: Future = field(default_factory=Future)

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])


# ---- requests -------------------------------------------------------------------------------------
def _describe(value) -> str:
    return f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__


def parse_request(body: bytearray, spec: str) -> Job:
    """Decodes a POST /reward body (see the module docstring); raises BadRequest saying what is wrong."""
    if len(body) < HEADER_LENGTH.size:
        raise BadRequest(f"body too short ({len(body)} bytes): expected a 4-byte header length, "
                         "a JSON header and the image bytes")
    (length,) = HEADER_LENGTH.unpack_from(body)
    if length > len(body) - HEADER_LENGTH.size:
        raise BadRequest(f"body too short: the header length says {length} bytes but only "
                         f"{len(body) - HEADER_LENGTH.size} bytes follow")
    start = HEADER_LENGTH.size + length  # where the images begin
    try:
        header = json.loads(bytes(body[HEADER_LENGTH.size:start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadRequest(f"header must be a JSON object with {', '.join(HEADER_FIELDS)}, got {_describe(header)}")
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        raise BadRequest(f"header lacks field(s) {', '.join(missing)}")
    if header["reward"] != spec:
        raise BadRequest(f"this server serves reward {spec!r}, not {header['reward']!r}")
    shape = header["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(s) is int and s > 0 for s in shape)
            and shape[1] == 3):
        raise BadRequest(f"shape must be [N, 3, H, W] with positive sizes, got {shape!r}")
    expected = math.prod(shape)
    if len(body) - start != expected:
        raise BadRequest(f"image data has {len(body) - start} bytes, shape {shape} needs {expected}")
    n = shape[0]
    prompts, metadata = header["prompts"], header["metadata"]
    if not (isinstance(prompts, list) and len(prompts) == n and all(isinstance(p, str) for p in prompts)):
        raise BadRequest(f"prompts must be a list of {n} strings (one per image), got {_describe(prompts)}")
    if not (isinstance(metadata, list) and len(metadata) == n and all(isinstance(m, dict) for m in metadata)):
        raise BadRequest(f"metadata must be a list of {n} objects (one per image), got {_describe(metadata)}")
    images = torch.frombuffer(body, dtype=torch.uint8, offset=start, count=expected).view(shape)
    return Job(images, prompts, metadata)


def jsonable(value):
    """Info values as JSON types: tensors and numpy values become numbers or lists, unknown objects strings."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


# ---- the worker -----------------------------------------------------------------------------------
class Batcher:
    """Runs the reward on one worker thread, one call at a time, batching requests that arrive together."""

    def __init__(self, fn, spec: str, max_batch: int, wait_s: float, start: bool = True):
        self.fn, self.spec, self.max_batch, self.wait_s = fn, spec, max_batch, wait_s
        self.queue: Queue[Job] = Queue()
        self.held: collections.deque[Job] = collections.deque()  # did not fit the last call: go first next time
        self.requests = self.calls = 0
        self.arriving = 0  # requests whose body is being read: worth waiting for
        self.lock = threading.Lock()
        if start:
            self.start()

    def start(self) -> None:
        threading.Thread(target=self._run, name="reward-worker", daemon=True).start()

    def arrival(self, delta: int) -> None:
        with self.lock:
            self.arriving += delta

    def submit(self, job: Job) -> bytes:
        """Queues a request and waits for its JSON answer; raises RewardFailed if the reward raised."""
        self.queue.put(job)
        return job.future.result()

    def _gather(self) -> list[Job]:
        """The next call's requests: the oldest one, then those that fit it (same size, at most max_batch
        images in all) among the held and queued ones, and those still arriving within wait_s (it waits
        only while a request is being received: a lone client pays no wait). A request larger than
        max_batch runs alone."""
        first = self.held.popleft() if self.held else self.queue.get()
        batch, total = [first], first.n
        held, self.held = self.held, collections.deque()

        def offer(job: Job) -> None:
            nonlocal total
            if job.size == first.size and total + job.n <= self.max_batch:
                batch.append(job)
                total += job.n
            else:
                self.held.append(job)

        for job in held:
            offer(job)
        deadline = time.monotonic() + self.wait_s
        while total < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.arriving:
                    break
                try:
                    job = self.queue.get(timeout=min(remaining, 0.001))
                except Empty:
                    continue
            offer(job)
        return batch

    def _call(self, batch: list[Job]) -> list[bytes]:
        """One reward call on the concatenated batch; each request's JSON answer."""
        images = batch[0].images if len(batch) == 1 else torch.cat([job.images for job in batch])
        prompts = [p for job in batch for p in job.prompts]
        metadata = [m for job in batch for m in job.metadata]
        scores, info = rewards._checked_call(self.fn, images, prompts, metadata)
        total, start, answers = len(prompts), 0, []
        for job in batch:
            end = start + job.n
            part = {k: v[start:end] if isinstance(v, list) and len(v) == total else v for k, v in info.items()}
            answers.append(json.dumps({"rewards": scores[start:end].tolist(), "info": jsonable(part)}).encode())
            start = end
        return answers

    def _answer(self, batch: list[Job]) -> None:
        """Runs one call and answers its requests. If a call of several requests fails, each is run
        again alone: one client's bad input (or a batch too large for the device) fails only its own."""
        self.calls += 1  # counted before the answers go out, so /health is never behind
        try:
            answers = self._call(batch)
        except Exception as e:  # the reward's failure is the request's answer, not the server's end
            if len(batch) > 1:
                for job in batch:
                    self._answer([job])
                return
            traceback.print_exc()
            self.requests += 1
            # A RewardError already names the reward and where it failed.
            what = str(e) if isinstance(e, rewards.RewardError) else f"reward {self.spec} failed: {type(e).__name__}: {e}"
            batch[0].future.set_exception(RewardFailed(what))
            return
        self.requests += len(batch)
        for job, answer in zip(batch, answers):
            job.future.set_result(answer)

    def _run(self) -> None:
        while True:
            self._answer(self._gather())


# ---- HTTP -----------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server_version = "ddpo_fast-reward"
    timeout = 300  # seconds: a client that stops sending mid-body does not hold a thread forever
    server: RewardHTTPServer

    def do_GET(self) -> None:
        if self._path() != "/health":
            return self._send(404, {"error": f"no such path {self.path!r}: use GET /health or POST /reward"})
        batcher = self.server.batcher
        self._send(200, {"reward": batcher.spec, "ready": True, "requests": batcher.requests, "calls": batcher.calls})

    def do_POST(self) -> None:
        if self._path() != "/reward":
            self.close_connection = True
            return self._send(404, {"error": f"no such path {self.path!r}: use POST /reward or GET /health"})
        self.server.batcher.arrival(+1)
        try:
            job = parse_request(self._read_body(), self.server.batcher.spec)
        except BadRequest as e:
            return self._send(400, {"error": str(e)})
        except TooLarge as e:
            return self._refuse_too_large(e)
        finally:
            self.server.batcher.arrival(-1)
        try:
            answer = self.server.batcher.submit(job)
        except RewardFailed as e:
            return self._send(500, {"error": str(e)})
        self._send(200, answer)

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path

    def _read_body(self) -> bytearray:
        """The body, read in chunks as it arrives: memory follows the bytes received, not the length a
        client declares (idle connections declaring gigabytes would otherwise fill the machine)."""
        given = self.headers.get("Content-Length")
        if given is None:
            self.close_connection = True
            raise BadRequest("missing Content-Length header")
        try:
            length = int(given)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True  # the body is left unread
            raise BadRequest(f"Content-Length {given!r} is not a byte count")
        cap = self.server.max_request_bytes
        if length > cap:
            raise TooLarge(length, cap)
        body = bytearray()
        while len(body) < length:
            chunk = self.rfile.read(min(READ_CHUNK_BYTES, length - len(body)))
            if not chunk:
                raise BadRequest(f"body ended after {len(body)} of its {length} bytes (Content-Length)")
            body += chunk
        return body

    def _refuse_too_large(self, e: TooLarge) -> None:
        """413, then the body read and dropped chunk by chunk, so that the client (which sends all of it
        before reading) gets the answer instead of a reset connection."""
        self._send(413, {"error": str(e)})
        left = e.length
        while left > 0:
            chunk = self.rfile.read(min(READ_CHUNK_BYTES, left))
            if not chunk:
                break
            left -= len(chunk)
        self.close_connection = True

    def _send(self, status: int, answer: dict | bytes) -> None:
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError as e:  # the client went away; nothing to answer
            self.log_error("could not send the answer: %s", e)

    def log_request(self, code="-", size="-") -> None:
        if not (isinstance(code, int) and code < 400):  # log failures only: the rest is the normal traffic
            super().log_request(code, size)


class RewardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many ranks connecting at once must not overflow the listen backlog

    def __init__(self, host: str, port: int, batcher: Batcher, max_request_bytes: int):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.batcher, self.max_request_bytes = batcher, max_request_bytes
        super().__init__((host, port), Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


# ---- the command --------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a dead child not yet waited for)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _watch_parent(pid: int) -> None:
    """Ends this process when `pid` is gone, so that a server whose trainer was killed does not linger."""
    while _alive(pid):
        time.sleep(PARENT_POLL_S)
    print(f"ddpo_fast reward server: parent process {pid} is gone; exiting", flush=True)
    os._exit(0)  # the worker may be inside the reward: nothing to clean up that the OS won't


def _write_port_file(path: str, port: int) -> None:
    """Atomically (write, then rename), so a reader never sees a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddpo_fast.rewards.serve",
        description="Serve a ddpo_fast reward over HTTP (POST /reward, GET /health), batching concurrent requests.")
    parser.add_argument("--reward", required=True,
                        help="reward spec: a name, module:function or NAME:WEIGHT,... (as the trainer's reward=)")
    parser.add_argument("--reward-options", default="", metavar="K=V,K=V",
                        help="the reward's options (as the trainer's reward_options=)")
    parser.add_argument("--device", help="passed as the reward's `device` option (e.g. cuda:1)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any other, e.g. 0.0.0.0, "
                             "exposes the server, which has no authentication, to the network)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: a free port)")
    parser.add_argument("--port-file", metavar="PATH",
                        help="write the port here once the reward is built and the server listens")
    parser.add_argument("--max-batch", type=int, default=64, help="most images per reward call (default 64)")
    parser.add_argument("--max-request-bytes", type=int, metavar="BYTES",
                        help="largest request body taken (413 above it; default: --max-batch images of "
                             f"{LARGEST_IMAGE[1]}x{LARGEST_IMAGE[2]} plus {HEADER_ALLOWANCE_BYTES >> 20} MiB)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long a call waits for requests still being received (default 5; "
                             "a lone client does not wait)")
    parser.add_argument("--parent-pid", type=int, metavar="PID",
                        help=f"exit when process PID is gone (checked every {PARENT_POLL_S:g} s)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = rewards.parse_options(args.reward_options)
    except ValueError as e:
        parser.error(f"--reward-options: {e}")
    if args.device is not None:
        if "device" in options:
            parser.error("--device and --reward-options device=... are both given; give one")
        options["device"] = args.device
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_request_bytes is None:
        args.max_request_bytes = default_max_request_bytes(args.max_batch)
    if args.max_request_bytes < 1:
        parser.error(f"--max-request-bytes must be at least 1, got {args.max_request_bytes}")
    if not (math.isfinite(args.batch_wait_ms) and args.batch_wait_ms >= 0):
        parser.error(f"--batch-wait-ms must be a finite number >= 0, got {args.batch_wait_ms}")
    if args.parent_pid is not None and args.parent_pid <= 0:
        parser.error(f"--parent-pid must be a process id > 0, got {args.parent_pid}")
    try:
        rewards.check(args.reward, **options)  # before building anything: a bad option fails in a second
    except ValueError as e:
        parser.error(str(e))
    if args.parent_pid is not None:  # watched while the model loads too
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), name="parent-watch", daemon=True).start()

    fn = rewards.build(args.reward, **options)
    batcher = Batcher(fn, args.reward, args.max_batch, args.batch_wait_ms / 1000.0)
    try:
        server = RewardHTTPServer(args.host, args.port, batcher, args.max_request_bytes)
    except OSError as e:
        sys.exit(f"ddpo_fast reward server: cannot listen on {args.host}:{args.port}: {e}")
    port = server.server_address[1]
    if args.port_file:
        _write_port_file(args.port_file, port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"ddpo_fast reward server: {args.reward} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
