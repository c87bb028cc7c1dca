"""The files of a run directory, written so that nothing is lost or half-trusted.

* ``config.json`` is compared with the new run's settings before anything is
  written: a directory that holds a different run is refused (the error names
  the differing flags) unless the caller asks to overwrite it.
* ``metrics.jsonl`` is appended chunk by chunk and fsynced *before* the
  checkpoint of that chunk is saved, so on resume from round R every line of a
  round < R is on disk; lines of rounds >= R (and a line torn by a kill) are
  dropped and recomputed, which makes a resumed file identical to an
  uninterrupted one.
* Whole-file writes go to a temporary file that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import numpy as np

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PARTICIPANTS = "participants.jsonl"  # --log_participants: the cohort of every round
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
RUN_FILES = (CONFIG, METRICS, PARTICIPANTS, SUMMARY, CHECKPOINTS, "corrupt_checkpoints")

# Settings that may change between a run and its resumption: they do not
# change any number the run produces.
RESUMABLE_CHANGES = frozenset({"rounds", "checkpoint_every", "keep_checkpoints", "build_dir"})


class WorkdirError(ValueError):
    """The work directory cannot be used as asked (one-line message)."""


def write_json_atomic(path: str, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_on_writer(workdir: str, settings: Mapping[str, Any], overwrite: bool) -> bool:
    """:func:`prepare` on process 0; its answer on every process of a multi-process run.

    Every process must restore the checkpoint, or none: a process that
    started fresh while the others resumed would silently mix two states.
    A refusal on process 0 stops the others too (with a pointer to process
    0's message) instead of leaving them waiting.
    """
    import jax  # here: the module itself works without devices

    if jax.process_count() == 1:
        return prepare(workdir, settings, overwrite)
    from jax.experimental import multihost_utils

    answer, error = 0, None
    if jax.process_index() == 0:
        try:
            answer = int(prepare(workdir, settings, overwrite))
        except WorkdirError as e:
            answer, error = -1, e
    answer = int(multihost_utils.broadcast_one_to_all(np.int32(answer)))
    if error is not None:
        raise error
    if answer < 0:
        raise WorkdirError(f"--workdir={workdir} was refused by process 0 (see its message)")
    return bool(answer)


def prepare(workdir: str, settings: Mapping[str, Any], overwrite: bool) -> bool:
    """Checks ``workdir`` against ``settings``; returns True if it holds this run.

    Raises:
      WorkdirError: the directory holds a run with other settings (or run
        files without a config) and ``overwrite`` is False.
    """
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, CONFIG)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
    if not present:
        return False
    if overwrite:
        for name in present:
            path = os.path.join(workdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return False
    if not os.path.exists(config_path):
        raise WorkdirError(
            f"--workdir={workdir} holds run files ({', '.join(present)}) but no {CONFIG}; "
            "use --overwrite to replace them"
        )
    try:
        with open(config_path) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        msg = f"--workdir={workdir}: cannot read {CONFIG} ({e}); use --overwrite to replace the run"
        raise WorkdirError(msg) from None
    diffs = [
        f"--{k} ({old.get(k)!r} -> {v!r})"
        for k, v in settings.items()
        if k not in RESUMABLE_CHANGES and old.get(k) != v
    ]
    if diffs:
        raise WorkdirError(
            f"--workdir={workdir} holds a run with a different configuration: {', '.join(diffs)}; "
            "use another --workdir or --overwrite"
        )
    return True


def read_metrics(workdir: str, before_round: int | None = None, name: str = METRICS) -> list[dict]:
    """Complete metric rows (optionally only rounds < before_round) of ``name`` (a per-round JSON-lines file)."""
    path = os.path.join(workdir, name)
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn by a kill mid-write
            try:
                row = json.loads(line)
            except ValueError:
                break
            if before_round is not None and row["round"] >= before_round:
                break
            rows.append(row)
    return rows


def reset_metrics(workdir: str, before_round: int, name: str = METRICS) -> list[dict]:
    """Keeps only rows of rounds < before_round in ``name`` (metrics.jsonl; atomically)."""
    rows = read_metrics(workdir, before_round, name)
    path = os.path.join(workdir, name)
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows


def append_metrics(workdir: str, rows: Iterable[dict], name: str = METRICS) -> None:
    """Appends rows to ``name`` (metrics.jsonl) and makes them durable before returning."""
    with open(os.path.join(workdir, name), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
