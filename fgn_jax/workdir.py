"""The files of a run directory, written so that nothing is lost or half-trusted.

* ``config.json`` is compared with the new run's settings before anything is
  written: a directory that holds a different run is refused (the error names
  the differing flags) unless the caller asks to overwrite it.
* ``metrics.jsonl`` is appended chunk by chunk and fsynced *before* the
  checkpoint of that chunk is saved, so on resume from round R every line of a
  round < R is on disk; lines of rounds >= R (and a line torn by a kill) are
  dropped and recomputed, which makes a resumed file identical to an
  uninterrupted one.
* Whole-file writes go to a temporary file that is renamed into place; the
  file then gets the mode a plain ``open`` would give it (0644 under the
  usual umask 022), not the temporary file's 0600, so collaborators and
  dashboards running as other users can read the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PARTICIPANTS = "participants.jsonl"  # --log_participants: the cohort of every round
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
RUN_FILES = (CONFIG, METRICS, PARTICIPANTS, SUMMARY, CHECKPOINTS, "corrupt_checkpoints", CURVES, TENSORBOARD)

# Settings that may change between a run and its resumption: they do not
# change any number the run produces.
RESUMABLE_CHANGES = frozenset({"rounds", "checkpoint_every", "keep_checkpoints", "build_dir"})


class WorkdirError(ValueError):
    """The work directory cannot be used as asked (one-line message)."""


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_atomic(path: str):
    """``(file, temporary path)``: a temporary file beside ``path``, with the mode ``open(path, "w")`` would give."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
    return os.fdopen(fd, "w"), tmp


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file renamed into place (fsynced first)."""
    f, tmp = _open_atomic(path)
    with f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON to ``path`` atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2))


def _on_writer(fn: Callable[[], int], workdir: str) -> int:
    """``fn()`` on process 0, its (non-negative int) answer on every process.

    A :class:`WorkdirError` on process 0 stops the others too (with a pointer
    to process 0's message) instead of leaving them waiting.
    """
    import jax  # here: the module itself works without devices

    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    answer, error = 0, None
    if jax.process_index() == 0:
        try:
            answer = int(fn())
        except WorkdirError as e:
            answer, error = -1, e
    answer = int(multihost_utils.broadcast_one_to_all(np.int32(answer)))
    if error is not None:
        raise error
    if answer < 0:
        raise WorkdirError(f"--workdir={workdir} was refused by process 0 (see its message)")
    return answer


def prepare_on_writer(workdir: str, settings: Mapping[str, Any], overwrite: bool) -> bool:
    """:func:`prepare` on process 0; its answer on every process of a multi-process run.

    Every process must restore the checkpoint, or none: a process that
    started fresh while the others resumed would silently mix two states.
    """
    return bool(_on_writer(lambda: int(prepare(workdir, settings, overwrite)), workdir))


def check_layout_on_writer(workdir: str, layout: Mapping[str, Any]) -> None:
    """:func:`check_layout` on process 0; its refusal raised on every process."""
    _on_writer(lambda: check_layout(workdir, layout) or 0, workdir)


def _read_config(workdir: str) -> dict:
    config_path = os.path.join(workdir, CONFIG)
    try:
        with open(config_path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        msg = f"--workdir={workdir}: cannot read {CONFIG} ({e}); use --overwrite to replace the run"
        raise WorkdirError(msg) from None


def prepare(workdir: str, settings: Mapping[str, Any], overwrite: bool) -> bool:
    """Checks ``workdir`` against the run's flags; returns True if it holds this run.

    Called before any data is generated or compiled, so ``settings`` holds
    only what the flags say (flag name -> value); what follows from the data
    and the devices is compared later by :func:`check_layout`.

    Raises:
      WorkdirError: the directory holds a run with other settings (or run
        files without a config) and ``overwrite`` is False.
    """
    os.makedirs(workdir, exist_ok=True)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
    if not present:
        return False
    if overwrite:
        for name in present:
            path = os.path.join(workdir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        return False
    if not os.path.exists(os.path.join(workdir, CONFIG)):
        raise WorkdirError(
            f"--workdir={workdir} holds run files ({', '.join(present)}) but no {CONFIG}; "
            "use --overwrite to replace them"
        )
    old = _read_config(workdir)
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


def check_layout(workdir: str, layout: Mapping[str, Any]) -> None:
    """Checks what follows from the flags *and* the devices (client slots, slot order) against ``workdir``.

    A checkpoint only fits the shapes it was saved with; with the same flags
    these differ only when the device count does.

    Raises:
      WorkdirError: the directory's run was laid out differently.
    """
    old = _read_config(workdir)
    diffs = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in layout.items() if old.get(k) != v]
    if diffs:
        raise WorkdirError(
            f"--workdir={workdir} holds the same configuration laid out for other devices ({'; '.join(diffs)}); "
            "resume it with the device count (--num_devices) it was run with, or use --overwrite"
        )


def finished_on_writer(workdir: str, rounds: int) -> dict | None:
    """:func:`finished_summary` read on process 0; every process learns whether the run is finished.

    Processes other than 0 get ``{"rounds": None}`` for a finished run (they
    may not see process 0's files).
    """
    import jax

    if jax.process_count() == 1:
        return finished_summary(workdir, rounds)
    summary = finished_summary(workdir, rounds) if jax.process_index() == 0 else None
    if _on_writer(lambda: int(summary is not None), workdir):
        return summary or {"rounds": None}
    return None


def finished_summary(workdir: str, rounds: int) -> dict | None:
    """The run's ``summary.json`` if the run in ``workdir`` has done at least ``rounds`` rounds, else None."""
    try:
        with open(os.path.join(workdir, SUMMARY)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("rounds", -1) >= rounds else None


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
    write_text_atomic(os.path.join(workdir, name), "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_metrics(workdir: str, rows: Iterable[dict], name: str = METRICS) -> None:
    """Appends rows to ``name`` (metrics.jsonl) and makes them durable before returning."""
    with open(os.path.join(workdir, name), "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
