"""The project's log: one format with the rank in every record, levels, and ``--log-level``.

    from common import log
    logger = log.get(__name__)            # "t3d.trainer.loop", ...
    logger.info("step %d", step)

Records go to the process's current ``sys.stdout`` (Ray forwards a worker's stdout to the driver
and the job log; pytest's capture sees them), formatted ``[t3d HH:MM:SS rank R LEVEL] message`` (the local time, to the second). The rank is
torch.distributed's where a group is up, else ``RANK`` from the environment, else ``-``. The level
comes from ``configure(level)`` (the entry points' ``--log-level``), else ``T3D_LOG_LEVEL``, else
INFO; ``configure`` puts it in ``T3D_LOG_LEVEL`` so that subprocesses log at the same level. tqdm
stays for progress bars.
"""
from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "T3D_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ROOT = "t3d"


class _Stdout(logging.StreamHandler):
    """A handler writing to whatever ``sys.stdout`` is at the time of the record."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):        # logging.StreamHandler.__init__ assigns it
        pass


class _Rank(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = _rank()
        return True


def _rank() -> str:
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return str(dist.get_rank())
    except (RuntimeError, ValueError):
        pass
    return os.environ.get("RANK", "-")


def configure(level: str | None = None) -> logging.Logger:
    """Set the project's log level (``level``, else ``T3D_LOG_LEVEL``, else INFO); idempotent."""
    name = (level or os.environ.get(LEVEL_ENV) or "INFO").upper()
    if name not in LEVELS:
        raise ValueError(f"log level: {level!r} is not one of {list(LEVELS)}")
    os.environ[LEVEL_ENV] = name
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        h = _Stdout()
        h.setFormatter(logging.Formatter("[t3d %(asctime)s rank %(rank)s %(levelname)s] %(message)s", "%H:%M:%S"))
        h.addFilter(_Rank())
        root.addHandler(h)
        root.propagate = False
    root.setLevel(name)
    return root


def get(name: str) -> logging.Logger:
    """The logger of module ``name``, under the project's root (configured on first use)."""
    if not logging.getLogger(ROOT).handlers:
        configure()
    return logging.getLogger(f"{ROOT}.{name}")


def add_level_arg(parser) -> None:
    """``--log-level`` on an entry point's argparse parser (apply it with ``configure``)."""
    parser.add_argument("--log-level", default=None, choices=LEVELS, type=str.upper,
                        help=f"log level (default: ${LEVEL_ENV} or INFO)")
