"""The one exit-code table of UHarmony, used by the CLI and shown by the Slicer modules.

Expected failures raise `UHarmonyError`; the CLI prints its one-line message (no traceback) and
exits with its code. Anything else is a bug and exits with `ExitCode.INTERNAL`.
"""

from __future__ import annotations

import enum
import os


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: please report it with the traceback printed on stderr
    USAGE = 2  # bad command line (argparse's own code)
    BAD_INPUT = 3  # an input image cannot be used: unreadable, truncated, not 3D, empty, NaN, ...
    BAD_MODEL = 4  # a model package is missing, corrupt, untrusted or does not match the input
    BAD_DATALIST = 5  # a dataset.json / datalist is malformed or points at unusable files
    OUTPUT_ERROR = 6  # the output exists (without --overwrite) or cannot be written
    OUT_OF_MEMORY = 7  # the work does not fit in the memory available
    CANCELLED = 8  # ended by the user (SIGINT / SIGTERM); partial outputs removed
    FEDERATION = 9  # a federated run could not start, lost its server, or was refused
    PARTIAL = 10  # a batch finished but some of its items failed (see the summary)


EXIT_CODE_HELP = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL: "internal error (a bug; the traceback is on stderr)",
    ExitCode.USAGE: "bad command line",
    ExitCode.BAD_INPUT: "bad input image",
    ExitCode.BAD_MODEL: "bad or untrusted model package",
    ExitCode.BAD_DATALIST: "bad datalist",
    ExitCode.OUTPUT_ERROR: "output exists or cannot be written",
    ExitCode.OUT_OF_MEMORY: "out of memory",
    ExitCode.CANCELLED: "cancelled",
    ExitCode.FEDERATION: "federation error",
    ExitCode.PARTIAL: "batch finished with failures",
}


class UHarmonyError(Exception):
    """An expected failure: one line naming the file (when there is one) and the problem."""

    code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, path: str | os.PathLike | None = None, code: ExitCode | None = None):
        self.message = message
        self.path = None if path is None else os.fspath(path)
        if code is not None:
            self.code = ExitCode(code)
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class BadInputError(UHarmonyError):
    code = ExitCode.BAD_INPUT


class BadModelError(UHarmonyError):
    code = ExitCode.BAD_MODEL


class BadDatalistError(UHarmonyError):
    code = ExitCode.BAD_DATALIST

    @classmethod
    def listing(cls, head: str, problems: list[str], path: str | os.PathLike | None = None) -> "BadDatalistError":
        """One error for several problems: ``head``, then one line per problem (kept as ``.problems``)."""
        err = cls("\n".join([head, *problems]), path)
        err.problems = list(problems)
        return err


class OutputError(UHarmonyError):
    code = ExitCode.OUTPUT_ERROR


class OutOfMemoryError(UHarmonyError):
    code = ExitCode.OUT_OF_MEMORY


class CancelledError(UHarmonyError):
    code = ExitCode.CANCELLED


class FederationError(UHarmonyError):
    code = ExitCode.FEDERATION
