"""Orbax checkpoints of training workdirs, preemption handling and `load_for_inference`.

Layout of a workdir DIR:
  DIR/config.json                  the resolved config of the run
  DIR/checkpoints/<step>/params/      raw params          (orbax, sharded arrays)
  DIR/checkpoints/<step>/ema_params/  EMA params
  DIR/checkpoints/<step>/train_state/ step, optimizer state, reference norms, RNG (and, for
                                   tasks that have them, partner networks such as a GAN
                                   discriminator with their optimizer states, and the
                                   non-trained variables)
  DIR/checkpoints/<step>/data/        grain iterator state, one file per process

Orbax writes each step into a temporary directory and renames it when every item is complete,
so an interrupted save is never listed, let alone restored. Saves are asynchronous.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from tokenizers_jax import exported
from tokenizers_jax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("params", "ema_params", "train_state", "data")


def save_config(workdir: str, config: ml_collections.ConfigDict):
    """Writes the resolved config to DIR/config.json (process 0)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, exported.CONFIG_FILE), "w") as f:
            f.write(exported.config_to_json(config))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, exported.CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a training workdir: {path} is missing")
    return exported.load_config(workdir)


def _manager(workdir: str, checkpoint_config: ml_collections.ConfigDict | None = None,
             read_only: bool = False) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    preservation = None
    if checkpoint_config is not None:
        keep = [policies.LatestN(n=checkpoint_config.keep)]
        if checkpoint_config.keep_every > 0:
            keep.append(policies.EveryNSteps(interval_steps=checkpoint_config.keep_every))
        preservation = policies.AnyPreservationPolicy(keep)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        enable_async_checkpointing=bool(checkpoint_config and checkpoint_config.async_save),
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options, item_names=ITEMS
    )


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step in `workdir`, or None."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
        return None
    with _manager(workdir, read_only=True) as manager:
        return manager.latest_step()


class Checkpointer:
    """Saves and restores TrainState + data iterator in `workdir/checkpoints` (all processes)."""

    def __init__(self, workdir: str, checkpoint_config: ml_collections.ConfigDict):
        self.workdir = workdir
        self.manager = _manager(workdir, checkpoint_config)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iterator: Any):
        """Starts an (async) save of `state` at its step; returns once the data state is taken."""
        step = int(jax.device_get(state.step))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                ema_params=ocp.args.StandardSave(state.ema_params),
                train_state=ocp.args.StandardSave(_train_state_item(state)),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
            force=True,
        )
        logging.info("saving checkpoint at step %d", step)

    def restore(self, step: int, abstract_state: TrainState, shardings: TrainState,
                data_iterator: Any) -> TrainState:
        """Restores step `step` onto `shardings`; `data_iterator` is set to its saved position."""
        abstract = _abstract(abstract_state, shardings)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract.params),
                ema_params=ocp.args.StandardRestore(abstract.ema_params),
                train_state=ocp.args.StandardRestore(_train_state_item(abstract)),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        logging.info("restored checkpoint at step %d from %s", step, self.workdir)
        return abstract_state.replace(
            params=restored.params, ema_params=restored.ema_params, **restored.train_state
        )

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


# TrainState fields kept in the train_state item only when the task has them (a single-model
# task's checkpoints hold exactly step, opt_state, reference_norms and rng).
OPTIONAL_FIELDS = ("partner_params", "partner_opt_state", "variables")


def _train_state_item(state: TrainState) -> dict[str, Any]:
    item = dict(step=state.step, opt_state=state.opt_state,
                reference_norms=state.reference_norms, rng=state.rng)
    item.update({name: getattr(state, name) for name in OPTIONAL_FIELDS
                 if jax.tree.leaves(getattr(state, name))})
    return item


def restore_params(workdir: str, abstract_params: Any, shardings: Any, item: str = "params",
                   step: int | None = None) -> Any:
    """Restores one params item ("params" or "ema_params") of a workdir onto `shardings`."""
    with _manager(workdir, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {workdir}/{CHECKPOINT_DIR}")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(_abstract(abstract_params, shardings))}
            ),
        )
    logging.info("restored %s of step %d from %s", item, step, workdir)
    return restored[item]


def load_for_inference(workdir: str) -> tuple[ml_collections.ConfigDict, Any]:
    """(config, EMA params) of the latest checkpoint of a training workdir, on the default device.

    Works on any device count: the arrays are re-laid out when read.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config = load_config(workdir)
    with _manager(workdir, read_only=True) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {workdir}/{CHECKPOINT_DIR}")
        metadata = manager.item_metadata(step)["ema_params"]
    tree = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, tree)
    return config, restore_params(workdir, tree, shardings, item="ema_params", step=step)


class PreemptionWatcher:
    """Tells, at each step boundary, whether the job was asked to stop (SIGTERM).

    With several processes, jax.distributed's preemption service (which handles SIGTERM)
    agrees on a common step; a single process installs its own SIGTERM handler.
    """

    def __init__(self):
        self._multi_process = jax.process_count() > 1
        self._stop = threading.Event()
        self._previous = None
        if not self._multi_process:
            if threading.current_thread() is not threading.main_thread():
                logging.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
            else:
                self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self._stop.set()

    def reached(self, step: int) -> bool:
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._stop.is_set()

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
