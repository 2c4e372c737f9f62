"""The reward of a training run, from its config: built in the trainer's process, or computed by a
reward server (started by rank 0 with `reward_server=auto`, or running at a URL)."""
from __future__ import annotations

from pathlib import Path

from ddpo_fast import config as cfg
from ddpo_fast import distributed
from ddpo_fast.rewards import build, parse_options
from ddpo_fast.rewards.client import RemoteReward, RewardServerError, health, start_server

SERVER_STARTUP_TIMEOUT = 600.0  # seconds rank 0 waits for an auto server (the others wait for rank 0)


def reward_options(config: cfg.Config) -> dict[str, str]:
    """reward_options with reward_device as the reward's device option."""
    options = parse_options(config.reward_options)
    if config.reward_device:
        if "device" in options:
            raise ValueError(f"reward_device={config.reward_device!r} and reward_options device={options['device']!r} "
                             "are both given; give one")
        options["device"] = config.reward_device
    return options


def make_reward(config: cfg.Config, run_dir: Path):
    """(reward function, reward server process or None) as config.reward_server says: in this process,
    a server started by rank 0 (auto; every rank sends it requests), or a running server at a URL.
    Every rank checks that it reaches the server before any model loads."""
    if not config.reward_server:
        return build(config.reward, **reward_options(config)), None
    server, url, error = None, config.reward_server, None
    if config.reward_server == "auto":
        if distributed.world()[0] == 0:
            distributed.log(f"starting the reward server (log: {run_dir / 'reward_server.log'})")
            try:
                server = start_server(config.reward, reward_options(config), log_path=run_dir / "reward_server.log",
                                      startup_timeout=SERVER_STARTUP_TIMEOUT)
                url = server.url
            except Exception as e:  # noqa: BLE001 - every rank must learn of it (below)
                error = f"reward_server=auto: {e}"
        url = distributed.broadcast_from_rank0(url)
    if error is None:
        try:
            served = health(url).get("reward")
            if served != config.reward:
                error = f"reward_server={url} serves reward {served!r}, but reward={config.reward!r}"
        except Exception as e:  # noqa: BLE001 - e.g. auto's 127.0.0.1 seen from another machine
            error = f"reward_server={url} (rank {distributed.world()[0]}): {e}"
    error = distributed.first_error_of_all_ranks(error)
    if error:
        if server is not None:
            server.close()
        raise RewardServerError(error)
    distributed.log(f"reward {config.reward} served at {url}")
    return RemoteReward(url, config.reward, timeout=config.reward_timeout), server
