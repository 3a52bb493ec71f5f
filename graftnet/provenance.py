"""What a result was produced with: the versions of graftnet and the libraries it ran on, and the command line.

Run folders (``run.json``) and tables (``graftnet tune``, ``graftnet demo``) record both, so whoever reads
a figure can rerun it on a fresh install and see whether it still holds.
"""

from __future__ import annotations

import platform
import shlex
import sys
from importlib import metadata

from graftnet._version import __version__

__all__ = ["command_line", "record_command", "versions"]

_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "mnist1d", "gymnasium", "ale-py", "minatar")


def versions() -> dict[str, str]:
    """``{"graftnet": ..., "python": ..., "torch": ..., ...}`` for graftnet, Python and the installed libraries
    it uses (a library that is not installed is left out).

    Examples:
        >>> versions()["graftnet"] == __version__
        True
    """
    found = {"graftnet": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


_recorded: list[str] | None = None


def record_command(argv: list[str]) -> None:
    """Name the command that produced this process's results (the CLI records ``graftnet ARGS``, also when
    its ``main`` is called from Python)."""
    global _recorded
    _recorded = list(argv)


def command_line() -> str:
    """The command this process was started with, quoted so that it can be pasted into a shell."""
    argv = list(_recorded if _recorded is not None else sys.argv)
    if argv and argv[0].endswith(("graftnet", "__main__.py")):
        argv[0] = "graftnet"
    elif argv and argv[0].endswith(".py"):  # a script: python examples/….py
        argv.insert(0, "python")
    return shlex.join(argv)
