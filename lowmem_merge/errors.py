"""The one exception type users see: a clear message, no traceback needed."""


class MergeError(Exception):
    """A problem with the user's input or environment, stated in one message."""


class InputFileError(MergeError):
    """An input file is missing, malformed or hostile."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class Interrupted(MergeError):
    """The user stopped the merge; the message says how to resume it."""


class TaskFailed(MergeError):
    """A task of a distributed merge failed; the files already finished are kept."""
