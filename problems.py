"""Bad input data: DataError (its message names the file, the line, the record and the problem) and Problems,
which collects the bad records of a reading pass so that one error lists them all (data.py, inputs.py)."""
from __future__ import annotations


MAX_LISTED = 20  # bad records listed by one error; those beyond are counted


class DataError(ValueError):
    """Bad input data; the message names the file, the record and the problem."""


class Problems:
    """The bad records of a reading pass, collected so that one error lists them all: the first `limit`
    messages are kept (each names its file, line and record), the rest only counted, so memory stays bounded
    whatever the input. error() is the DataError: one problem as its own message, several as a list."""

    def __init__(self, limit: int = MAX_LISTED):
        self.messages: list[str] = []
        self.count, self.limit = 0, limit

    def add(self, message) -> None:
        self.count += 1
        if len(self.messages) < self.limit:
            self.messages.append(str(message))

    def error(self, what) -> DataError | None:
        """None without problems; else the DataError for them, `what` naming the input read."""
        if not self.count:
            return None
        if self.count == 1:
            return DataError(self.messages[0])
        more = f"\n  ... and {self.count - len(self.messages)} more" if self.count > len(self.messages) else ""
        return DataError(f"{what}: {self.count} problems (fix them all, then run again):\n  "
                         + "\n  ".join(self.messages) + more)

    def check(self, what) -> None:
        """Raise error(what), if there is one."""
        error = self.error(what)
        if error is not None:
            raise error


def report(problems: Problems | None, message: str) -> None:
    """A bad record: collected in `problems`, or without a collector raised at once."""
    if problems is None:
        raise DataError(message)
    problems.add(message)
