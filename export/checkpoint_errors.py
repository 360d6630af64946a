"""The error every checkpoint reader raises, and how its messages are put together."""

from __future__ import annotations

__all__ = ["CheckpointError", "fmt_shape", "raise_problems"]


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or inconsistent with its config.

    The message always starts with the offending file's name (and names the tensor where one is
    involved). `problems` lists every problem found when several were collected at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


def fmt_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def raise_problems(problems: list[str]) -> None:
    if not problems:
        return
    msg = problems[0]
    if len(problems) > 1:
        shown = problems[1:6]
        more = len(problems) - 1 - len(shown)
        msg += "\n  also: " + "\n  also: ".join(shown)
        if more:
            msg += f"\n  ... and {more} more problem(s)"
    raise CheckpointError(msg, problems)
