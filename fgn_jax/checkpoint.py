"""Checkpoints of the whole simulation state with orbax-checkpoint.

The saved pytree is the full :class:`~fgn_jax.simulate.SimState`: trunk,
every client head, all optimiser states, task weights and ``L(0)``, the
round counter and the base RNG key (stored as raw key data). Minibatch
sampling is a pure function of (key, round, client id), so the round counter
*is* the data-sampling state and a restored run continues bit for bit.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed mid-save leaves no checkpoint that a later run
would trust. A checkpoint that cannot be read (corrupted on disk) is moved
aside to ``<workdir>/corrupt_checkpoints/`` and the previous one is used.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp

from fgn_jax import simulate


def _to_saveable(state: simulate.SimState):
    return state.replace(key=jax.random.key_data(state.key))


def _from_saveable(tree) -> simulate.SimState:
    return tree.replace(key=jax.random.wrap_key_data(tree.key))


class Checkpointer:
    """Saves and restores SimStates under ``directory``, keeping the last few.

    Args:
      directory: where step directories (named by round) live.
      keep: how many checkpoints to keep.
      corrupt_dir: where unreadable checkpoints are moved.
    """

    def __init__(self, directory: str, keep: int = 3, corrupt_dir: str | None = None):
        self.directory = os.path.abspath(directory)
        self.corrupt_dir = corrupt_dir or os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: simulate.SimState) -> float:
        """Writes a checkpoint for ``step`` (rounds done); returns seconds taken."""
        start = time.time()
        self._manager.save(step, args=ocp.args.StandardSave(_to_saveable(state)), force=True)
        self._manager.wait_until_finished()
        return time.time() - start

    def restore_latest(
        self, template: simulate.SimState, say: Callable[[str], None] = print
    ) -> tuple[simulate.SimState, int] | None:
        """Restores the newest readable checkpoint, or None if there is none.

        ``template`` gives structure, shapes, dtypes and shardings. An
        unreadable checkpoint is reported through ``say``, moved aside, and the
        next older one is tried.
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
        for step in reversed(self.steps()):
            try:
                tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
                return _from_saveable(tree), step
            except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                os.makedirs(self.corrupt_dir, exist_ok=True)
                dest = os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}")
                shutil.move(os.path.join(self.directory, str(step)), dest)
                say(f"checkpoint at round {step} is unreadable ({reason}); moved to {dest}, using an older one")
                self._manager.reload()
        return None

    def close(self) -> None:
        self._manager.close()
