"""The one exception type prefloop raises for bad input: the CLI prints it as one line."""

from __future__ import annotations


class PrefloopError(Exception):
    """Bad input or state the user can fix; the message names file, row and field.

    The message is always one line: a line break inside it (say, from a parser's own
    multi-line message) is folded into a space, so the CLI's "one line on stderr" holds.
    """

    def __str__(self) -> str:
        return " ".join(part.strip() for part in super().__str__().splitlines() if part.strip())


class BadScore(PrefloopError):
    """A scorer returned a value that is not a finite number for the response at `index` of
    the batch it was given; whoever knows which file row that was re-raises with it."""

    def __init__(self, message: str, index: int, detail: str):
        super().__init__(message)
        self.index, self.detail = index, detail


def where(source: str | None = None, row: int | None = None, field: str | None = None) -> str:
    """`file.jsonl, line 4, field 'chosen'` — the location prefix of an error message.

    `row` is the 0-based index of a record as it was read. It is shown 1-based, one
    convention everywhere: for a JSONL file as the file line that holds the record (the
    readers skip blank lines; they are counted here), otherwise as ``row N``.
    """
    parts = []
    if source is not None:
        parts.append(str(source))
    if row is not None:
        line = _jsonl_line(source, row)
        parts.append(f"line {line}" if line is not None else f"row {row + 1}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)


def _jsonl_line(source: str | None, row: int) -> int | None:
    """The 1-based line of the `row`-th non-blank line of a JSONL file; None for anything
    else. Read only when an error is being reported."""
    if source is None or not str(source).endswith(".jsonl") or row < 0:
        return None
    from pathlib import Path

    path = Path(source)
    if not path.is_file():
        return None
    seen = -1
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                seen += 1
                if seen == row:
                    return lineno
    return None
