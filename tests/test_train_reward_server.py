"""The trainer with its rewards in a reward server: reward_server=auto, a running server at a URL, and
a server that dies mid-run (a clear error, the checkpoints kept)."""
import re
import socket
from urllib.parse import urlparse

import pytest

import ddpo_fast.train as train
from ddpo_fast import config as cfg
from ddpo_fast.rewards.client import start_server
from train_helpers import TINY, metrics, run_deepspeed, run_train

ONE_EPOCH = [*TINY, "num_epochs=1"]


def _port_closed(url: str) -> bool:
    address = urlparse(url)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address.hostname, address.port)) != 0


@pytest.fixture(scope="module")
def in_process_record(tmp_path_factory):
    run = tmp_path_factory.mktemp("in_process") / "run"
    run_train(["--run-dir", str(run), *ONE_EPOCH])
    return metrics(run)[0]


def test_auto_server_gives_the_in_process_rewards_and_stops_with_the_run(tmp_path, in_process_record):
    run = tmp_path / "run"
    proc = run_train(["--run-dir", str(run), *ONE_EPOCH, "reward_server=auto"])
    url = re.search(r"reward jpeg_compressibility served at (http://127\.0\.0\.1:\d+)", proc.stdout).group(1)
    (record,) = metrics(run)
    # Same seed, same images: the served rewards are the in-process ones.
    assert record["reward_mean"] == in_process_record["reward_mean"]
    assert record["reward_std"] == in_process_record["reward_std"]
    assert "ddpo_fast reward server: jpeg_compressibility on " in (run / "reward_server.log").read_text()
    assert _port_closed(url)  # the trainer stopped its server


def test_running_server_at_a_url(tmp_path, in_process_record):
    with start_server("jpeg_compressibility") as server:
        run = tmp_path / "run"
        run_train(["--run-dir", str(run), *ONE_EPOCH, f"reward_server={server.url}"])
        assert metrics(run)[0]["reward_mean"] == in_process_record["reward_mean"]
        proc = run_train(["--run-dir", str(tmp_path / "other"), *ONE_EPOCH, "reward=jpeg_incompressibility",
                          f"reward_server={server.url}"], check=False)
    assert proc.returncode == 1
    assert (f"reward_server={server.url} serves reward 'jpeg_compressibility', but reward='jpeg_incompressibility'"
            in proc.stderr)


def test_no_server_at_the_url_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_train(["--run-dir", str(tmp_path / "run"), *ONE_EPOCH, f"reward_server=http://127.0.0.1:{port}"],
                     check=False, timeout=120)
    assert proc.returncode == 1 and f"reward_server=http://127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_dying_mid_run_stops_the_trainer_with_a_clear_error(tmp_path):
    run = tmp_path / "run"
    # The server SIGKILLs itself at its 3rd reward call: epoch 0 (2 batches) completes, epoch 1 does not.
    proc = run_train(["--run-dir", str(run), *TINY, "num_epochs=3", "reward=train_helpers:kill_once_reward",
                      "reward_server=auto", "reward_timeout=5"], check=False, timeout=240,
                     extra_env={"DDPO_TEST_KILL_AT": "3", "DDPO_TEST_KILL_MARKER": str(tmp_path / "killed")})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (tmp_path / "killed").exists()
    assert "ddpo_fast.train: error: reward server http://127.0.0.1:" in proc.stderr
    assert "gave no answer" in proc.stderr
    assert [r["epoch"] for r in metrics(run)] == [0]
    assert (run / "checkpoints" / "epoch-0").is_dir()  # the finished epoch's checkpoint is kept


@pytest.mark.parametrize("value", ["yes", "https://127.0.0.1:8000", "http://127.0.0.1:8000/v1", "127.0.0.1:8000"])
def test_bad_reward_server_values_are_named(tmp_path, value):
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), f"reward_server={value}"])
    with pytest.raises(cfg.ConfigError, match="reward_server must be '' .in the trainer., auto or an http://HOST:PORT URL"):
        train.resolve_config(args, 1)


@pytest.mark.parametrize("extra", ["reward_options=quality=5", "reward_device=cpu"])
def test_options_with_a_running_server_are_refused(tmp_path, extra):
    args = train.parse_args(["--run-dir", str(tmp_path / "run"), "reward_server=http://127.0.0.1:8000", extra])
    with pytest.raises(cfg.ConfigError, match="reward_options and reward_device are not used with it"):
        train.resolve_config(args, 1)


def test_bad_reward_timeout_is_named(tmp_path):
    proc = run_train(["--run-dir", str(tmp_path / "run"), "reward_timeout=0"], check=False)
    assert proc.returncode == 2 and "reward_timeout must be > 0" in proc.stderr


def test_two_ranks_share_one_auto_server(tmp_path):
    run = tmp_path / "run"
    proc = run_deepspeed(["--run-dir", str(run), *ONE_EPOCH, "reward_server=auto"])
    urls = set(re.findall(r"reward jpeg_compressibility served at (http://127\.0\.0\.1:\d+)", proc.stdout))
    assert len(urls) == 1  # logged by rank 0; both ranks checked it before loading
    (record,) = metrics(run)
    assert record["reward_mean"] < 0 and record["reward_std"] > 0
    assert _port_closed(urls.pop())
