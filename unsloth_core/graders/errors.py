"""Errors about a grader as a whole. A problem with one sample is not raised: it is recorded on that sample's
`GradeResult` (its score 0), as OpenAI's graders do."""

from __future__ import annotations

from unsloth_core.errors import UnslothError


class GraderError(UnslothError):
    """Base class of the errors below."""


class GraderValidationError(GraderError):
    """A grader object that does not parse or cannot run as written (raised when it is validated, before grading).

    `problems` holds every (path, message) found; `param` is the first path, dotted from the grader's root
    (`graders.accuracy.operation`), for an API error's `param`.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.param = problems[0][0] if problems else ""
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in problems))


class GraderUnavailableError(GraderError):
    """A valid grader this call cannot run: python graders switched off, no judge for a model grader, no embedding
    model for `cosine`, or no sandbox for python on this machine. Nothing is graded; the message says what to set."""
