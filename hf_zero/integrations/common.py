"""What the Accelerate and Trainer integrations share: the world-size guard, process-group
teardown at exit and the resolution of the engine's ZeroConfig.

Each host framework (Accelerate, the Trainer, which builds its own Accelerator) decides how
many processes train together. hf_zero's engine communicates over torch.distributed. When the
two disagree, a job runs wrong without an error: under `accelerate launch --multi_gpu` on a
machine without GPUs and without `ACCELERATE_USE_CPU=1`, every process believes it is rank 0 of
1, trains alone on the whole data set and writes into the same output folder. `check_world`
stops such a job before training, naming both numbers and the fix.

Nothing here calls torch.distributed: the world comes from `hf_zero.comm`.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from .. import comm
from ..config import ZeroConfig

__all__ = [
    "WorldMismatchError",
    "check_world",
    "cpu_launch_fix",
    "guard_world",
    "install_exit_teardown",
    "resolve_zero_config",
]

# Launcher variables that say how many processes were started.
_LAUNCHER_VARS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE")


class WorldMismatchError(RuntimeError):
    """The launcher, torch.distributed and the host framework disagree on the number of
    processes."""


def cpu_launch_fix(processes: int) -> str:
    """The launch that works, for the guard's message."""
    n = max(processes, 2)
    return (
        f"on CPU, launch with `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
        f"--num_processes {n} --main_process_port <free port> script.py` (or "
        f"`torchrun --nproc_per_node {n}` with Accelerator(cpu=True)); on GPUs, make sure "
        "every process sees its own GPU"
    )


def check_world(
    host_processes: int,
    *,
    world: comm.WorldInfo,
    env: Mapping[str, str],
    host: str = "Accelerate",
) -> None:
    """Stop a job whose processes would each train alone. Pure: the numbers come in.

    Args:
        host_processes: the processes the host framework trains with
            (`accelerator.num_processes`, `TrainingArguments.world_size`).
        world: `hf_zero.comm.default_world()`.
        env: the environment (`os.environ`): WORLD_SIZE and LOCAL_WORLD_SIZE, set by torchrun
            and `accelerate launch`.
        host: the host framework's name, for the message.

    Raises:
        WorldMismatchError: torch.distributed has more processes than the host, or the
            launcher started several processes while the host and the world are one.
    """
    alone = (
        "each process would train alone on all the data and write into the same output "
        "folder. Stopped before training"
    )
    if world.initialized and world.world_size > host_processes:
        raise WorldMismatchError(
            f"torch.distributed has {world.world_size} processes but {host} trains with "
            f"{host_processes}: {alone}; {cpu_launch_fix(world.world_size)}"
        )
    if host_processes > 1 or (world.initialized and world.world_size > 1):
        return
    for var in _LAUNCHER_VARS:
        value = env.get(var, "").strip()
        if value.isdigit() and int(value) > 1:
            raise WorldMismatchError(
                f"the launcher started {value} processes ({var}={value}) but {host} trains "
                f"with {host_processes} and torch.distributed with {world.world_size}: {alone}; "
                f"{cpu_launch_fix(int(value))}"
            )


def guard_world(host_processes: int, *, host: str = "Accelerate") -> None:
    """`check_world` on this process's world and environment (the entry points call this)."""
    check_world(host_processes, world=comm.default_world(), env=os.environ, host=host)


_teardown_installed = False


def install_exit_teardown() -> None:
    """Destroy the default process group when the interpreter exits (idempotent).

    gloo jobs whose process group is still alive at interpreter exit often abort there, after
    the work is done, and the launcher then reports a failure.
    """
    global _teardown_installed
    if not _teardown_installed:
        atexit.register(comm.destroy_process_group)
        _teardown_installed = True


def resolve_zero_config(
    zero_config: ZeroConfig | str | os.PathLike | None = None,
    *,
    stage: int | None = None,
    host_mixed_precision: str = "no",
    host_setting: str = "Accelerate's mixed_precision",
) -> ZeroConfig:
    """The engine's config from the integration's arguments and the host's precision setting.

    Args:
        zero_config: a ZeroConfig, a path to a YAML or JSON ZeroConfig file
            (`ZeroConfig.from_file`), or None for the defaults.
        stage: a ZeRO stage given on its own (`ZeroTrainingArguments.zero_stage`); None: the
            config's. When both are given they must agree.
        host_mixed_precision: the host framework's setting: "no", "bf16" or "fp16"
            (`accelerator.mixed_precision`; "bf16" for `TrainingArguments(bf16=True)`).
        host_setting: how the message names the host's setting.

    Returns:
        The ZeroConfig. Mixed precision comes from the host when the config leaves it at "no",
        from the config when the host says "no".

    Raises:
        ValueError: the stage or the mixed precision conflicts (the message names both values),
            or the host asks for a precision the engine does not have (fp8).
        FileNotFoundError: the config file does not exist.
    """
    source = "the ZeroConfig"
    if isinstance(zero_config, str | os.PathLike):
        source = f"config file {str(Path(zero_config))!r}"
        config = ZeroConfig.from_file(zero_config)
    elif zero_config is None:
        config = ZeroConfig() if stage is None else ZeroConfig(stage=stage)
    elif isinstance(zero_config, ZeroConfig):
        config = zero_config
    else:
        raise TypeError(
            "zero_config must be a hf_zero.ZeroConfig, a path to a YAML/JSON ZeroConfig file or "
            f"None, got {type(zero_config).__name__}"
        )
    if stage is not None and stage != config.stage:
        raise ValueError(
            f"ZeRO stage {stage} was asked for, but {source} has stage {config.stage}; give the "
            "stage in one place only"
        )
    host = host_mixed_precision or "no"
    if host not in ("no", "bf16", "fp16"):
        raise ValueError(
            f"{host_setting} is {host!r}, which hf_zero does not run: its engine computes in "
            "'no' (fp32), 'bf16' or 'fp16' and keeps fp32 master weights"
        )
    if host != "no" and config.mixed_precision == "no":
        return dataclasses.replace(config, mixed_precision=host)
    if host != "no" and host != config.mixed_precision:
        raise ValueError(
            f"{host_setting} is {host!r} but {source} has mixed_precision="
            f"{config.mixed_precision!r}; set one of them, or make them agree"
        )
    return config
