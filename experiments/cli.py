"""absl flags shared by the entry points (train, sweep), their help and their errors.

* one flag per :class:`fgn_jax.training.ExperimentConfig` field, with the
  field's default and its help, group and choices from
  :data:`fgn_jax.training.FLAG_DOCS` (so a new config field is a new flag
  everywhere; choice fields become enum flags);
* ``--help`` lists the entry point's own flags by group (data, model and
  algorithm, federation, output, performance); ``--helpfull`` keeps absl's
  full list;
* every flag error (a bad value, an unknown flag, a missing ``--workdir``, a
  stray argument) prints one line and exits with code 2, like the
  validation errors of :meth:`~fgn_jax.training.ExperimentConfig.validate`;
* library INFO logging (orbax, absl, JAX's backend probing) is off unless
  ``--verbosity`` asks for it;
* the multi-host flags that join a ``jax.distributed`` run (docs/scaling.md).
* ``--compilation_cache_dir``: JAX's persistent compilation cache, on by
  default, so a second run of the same program loads its compiled chunks
  instead of compiling them again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import sys
import textwrap
from typing import Callable, NamedTuple

from absl import flags
from absl import logging as absl_logging
import jax

from fgn_jax import sharding, training

OTHER_GROUP = "other"
# Flag name -> --help group, for the flags defined through this module.
_GROUP_OF: dict[str, str] = {}
_REQUIRED: set[str] = set()


def grouped(group: str, holder: flags.FlagHolder) -> flags.FlagHolder:
    """Lists ``holder``'s flag under ``group`` in ``--help``; returns it."""
    _GROUP_OF[holder.name] = group
    return holder


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, flags.FlagHolder]:
    """Defines a flag per ExperimentConfig field; returns the holders by name.

    Help, group and choices come from :data:`fgn_jax.training.FLAG_DOCS`; a
    field missing there gets a generic help under "other".
    """
    defaults = training.ExperimentConfig()
    holders = {}
    for field in dataclasses.fields(training.ExperimentConfig):
        default = getattr(defaults, field.name)
        doc = training.FLAG_DOCS.get(field.name) or training.FlagDoc(
            OTHER_GROUP, f"See fgn_jax.training.ExperimentConfig.{field.name}."
        )
        if doc.choices is not None:
            holder = flags.DEFINE_enum(field.name, default, list(doc.choices), doc.help, flag_values=flag_values)
        else:
            define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(
                type(default), flags.DEFINE_string
            )
            holder = define(field.name, default, doc.help, flag_values=flag_values)
        holders[field.name] = grouped(doc.group, holder)
    return holders


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or '""'
    return str(value) if value != "" else '""'


def usage(doc: str) -> str:
    """The ``--help`` text: ``doc`` (the entry point's docstring), then its flags by group."""
    by_group: dict[str, list[str]] = {}
    for name, group in _GROUP_OF.items():
        by_group.setdefault(group, []).append(name)
    order = [*training.FLAG_GROUPS, *sorted(set(by_group) - set(training.FLAG_GROUPS))]
    lines = [doc.strip(), ""]
    for group in order:
        if group not in by_group:
            continue
        lines.append(f"{group} flags:")
        for name in by_group[group]:
            flag = flags.FLAGS[name]
            choices = getattr(flag.parser, "enum_values", None)
            kind = "one of " + "|".join(choices) if choices else flag.flag_type()
            required = ", required" if name in _REQUIRED else ""
            lines.append(f"  --{name}: {kind} (default {_show(flag.default)}{required})")
            text = flag.help
            if choices and text.startswith("<"):  # absl prefixes an enum's help with its choices, shown above
                text = text.split(">: ", 1)[-1]
            lines += textwrap.wrap(text, 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append("")
    lines.append("--verbosity=0 shows the libraries' INFO logging; --helpfull lists every flag, absl's included.")
    return "\n".join(lines)


def define_workdir(help_text: str) -> flags.FlagHolder:
    """The required ``--workdir`` flag (output group)."""
    _REQUIRED.add("workdir")
    return grouped("output", flags.DEFINE_string("workdir", None, help_text, required=True))


def fail(message: str) -> None:
    """Prints ``error: <message>`` as one line on stderr and exits with code 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    sys.exit(2)


def _one_line(error: flags.Error) -> str:
    # absl: "flag --rounds=abc: invalid literal ..." -> "--rounds=abc: invalid literal ..."
    text = str(error)
    missing = re.search(r"Flag --(\w+) must have a value other than None", text)
    if missing:
        return f"--{missing.group(1)}: required (no default)"
    return text[len("flag ") :] if text.startswith("flag --") else text


def flags_parser(doc: str, positional: bool = False) -> Callable[[list[str]], list[str]]:
    """An ``app.run(..., flags_parser=...)`` parser: grouped ``--help``, one-line errors, exit code 2.

    Args:
      doc: the entry point's docstring, shown first by ``--help``.
      positional: the entry point takes positional arguments (else they are an error).

    Returns:
      ``parse(argv) -> argv`` without the flags.
    """

    def parse(argv: list[str]) -> list[str]:
        if any(a in ("-h", "-?", "--help", "--helpshort") for a in argv[1:]):
            print(usage(doc))
            sys.exit(0)
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            fail(_one_line(e))
        if len(rest) > 1 and not positional:
            fail(f"unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)")
        return rest

    return parse


# Loggers of the libraries we call that log at INFO on every checkpoint or at start-up.
QUIET_LOGGERS = ("orbax", "absl", "jax", "tensorflow_datasets", "tensorboardX")


def quiet_logging() -> None:
    """Library logging at WARNING unless ``--verbosity`` was given (call at the start of ``main``).

    absl turns INFO on when ``--verbosity`` is not given; a user of the
    simulator only wants its own lines (and warnings).
    """
    if flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_or_exit(run: Callable[[], object]) -> None:
    """Runs an entry point's work; known failures print one line and exit.

    Exit codes: 2 for bad flags or inputs (``training.USER_ERRORS``), 3 for a
    divergence, 128 + N when stopped by signal N (after checkpointing).
    """
    try:
        run()
    except training.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except training.Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except training.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)


def config_from_flags(holders: dict[str, flags.FlagHolder]) -> training.ExperimentConfig:
    return training.ExperimentConfig(**{name: holder.value for name, holder in holders.items()})


class DistributedFlags(NamedTuple):
    distributed: flags.FlagHolder
    coordinator_address: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder
    local_device_ids: flags.FlagHolder


def define_distributed_flags() -> DistributedFlags:
    multi_host = functools.partial(grouped, "multi-host (docs/scaling.md)")
    return DistributedFlags(
        distributed=multi_host(
            flags.DEFINE_bool(
                "distributed",
                False,
                "Join a multi-process run, detecting the cluster (SLURM, Open MPI, TPU pod) when "
                "--coordinator_address is not given. Only process 0 writes files.",
            )
        ),
        coordinator_address=multi_host(
            flags.DEFINE_string(
                "coordinator_address", None, "host:port of process 0 in a multi-process run (implies --distributed)."
            )
        ),
        num_processes=multi_host(flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run.")),
        process_id=multi_host(
            flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
        ),
        local_device_ids=multi_host(
            flags.DEFINE_list(
                "local_device_ids",
                [],
                "Local GPUs this process drives, e.g. 0,1,2,3 (default: JAX's choice; under SLURM that is one GPU "
                "per process, so one process per host needs them all).",
            )
        ),
    )


def maybe_initialize_distributed(holders: DistributedFlags) -> None:
    """Calls :func:`fgn_jax.sharding.initialize_distributed` if the flags ask for it."""
    if holders.distributed.value or holders.coordinator_address.value:
        sharding.initialize_distributed(
            holders.coordinator_address.value,
            holders.num_processes.value,
            holders.process_id.value,
            [int(i) for i in holders.local_device_ids.value],
        )


# Outside any workdir: compiled programs are shared by every run of this user.
# The environment variable overrides the default (the tests set it to "" so
# that they never write into the user's cache).
DEFAULT_COMPILATION_CACHE_DIR = os.path.join("~", ".cache", "fgn_jax", "jax_cache")
COMPILATION_CACHE_ENV = "FGN_JAX_COMPILATION_CACHE_DIR"


def define_compilation_cache_flag() -> flags.FlagHolder:
    default = os.environ.get(COMPILATION_CACHE_ENV, DEFAULT_COMPILATION_CACHE_DIR)
    return flags.DEFINE_string(
        "compilation_cache_dir",
        default,
        f"JAX's persistent compilation cache (empty: off; default from ${COMPILATION_CACHE_ENV} if set).",
    )


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` (``~`` expanded); ``""`` leaves it off.

    Every program is cached, however small or quick to compile: the round
    chunk is the largest, but a run compiles dozens of small ones (init,
    evaluation, checkpoint helpers) whose compile times add up.
    """
    if not path:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
