"""Reading text: plain or gzip files, and byte streams, as lines of UTF-8 text.

    file (.gz or plain) ──read_lines──▶ bytes ──decode_lines──▶ TextFile(lines, invalid_lines)
    file (.gz or plain) ──TextLines──▶ one line at a time (a corpus larger than memory)

One policy everywhere: a line ends at `\\n` (a `\\r` before it is dropped), a UTF-8 byte
order mark at the start is dropped, and invalid UTF-8 either stops with the file and line
(`errors="strict"`) or becomes U+FFFD and is counted (`"replace"`).

This module imports neither torch nor numpy, so `rnmt score` computing metrics alone
starts in a fraction of a second.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rnmt.errors import ConfigError, DataError

ERROR_POLICIES = ("strict", "replace")


def check_error_policy(errors: str) -> None:
    """A ConfigError for an `--errors` value that is no UTF-8 error policy."""
    if errors not in ERROR_POLICIES:
        raise ConfigError(f"unknown --errors {errors!r}; choose {' or '.join(ERROR_POLICIES)}")


@dataclass
class TextFile:
    """The lines of a text file and how many of them held invalid UTF-8."""

    lines: list[str]
    invalid_lines: int


def decode_line(raw: bytes, name: str, number: int, errors: str) -> tuple[str, bool]:
    """One line's bytes (without `\\n`) -> its text and whether it held invalid UTF-8.

    `errors="strict"` raises a DataError naming `name` and line `number`."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as err:
        if errors == "strict":
            raise DataError(
                f"{name}: line {number}: invalid UTF-8 at byte {err.start} "
                "(use --errors replace to substitute U+FFFD)"
            ) from None
        return raw.decode("utf-8", errors="replace"), True


def read_lines(path: str | Path, errors: str = "replace") -> TextFile:
    """Read a plain or gzip text file as lines without their ending (`\\n` or `\\r\\n`).

    `errors="strict"` stops at the first invalid UTF-8 byte with a `DataError` that names
    the file and line; `"replace"` substitutes U+FFFD and counts the lines it touched.
    A UTF-8 byte order mark at the start is dropped.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:
        raise read_error(path, err) from None
    return decode_lines(raw, str(path), errors)


def read_error(path: Path, err: Exception) -> DataError:
    """The one-line DataError for a text file that cannot be opened or read to its end."""
    if isinstance(err, FileNotFoundError):
        return DataError(f"{path}: no such file")
    if isinstance(err, IsADirectoryError):
        return DataError(f"{path}: is a directory, not a text file")
    if isinstance(err, PermissionError):
        return DataError(f"{path}: permission denied")
    return DataError(f"{path}: cannot read ({err})")


class LineReader:
    """Lines of a binary stream, decoded one at a time (never the whole stream at once).

    `errors="strict"`: invalid UTF-8 is a DataError naming the line; `"replace"`
    substitutes U+FFFD and counts the lines touched in `invalid_lines`.
    """

    def __init__(self, stream: BinaryIO, name: str, errors: str = "replace") -> None:
        check_error_policy(errors)
        self.stream, self.name, self.errors = stream, name, errors
        self.invalid_lines = 0

    def __iter__(self) -> Iterator[str]:
        for number, raw in enumerate(iter(self.stream.readline, b""), start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                if not raw:
                    return  # the stream was a byte order mark alone: no line of text
            line, invalid = decode_line(raw.rstrip(b"\n"), self.name, number, self.errors)
            self.invalid_lines += invalid
            yield line


class TextLines:
    """The lines of a plain or gzip text file, streamed from disk on every iteration (never
    the whole file in memory) under the policy of `read_lines`, which they equal.
    `lines` and `invalid_lines` count the last pass.
    """

    def __init__(self, path: str | Path, errors: str = "replace") -> None:
        check_error_policy(errors)
        self.path = Path(path)
        self.errors = errors
        self.lines = 0
        self.invalid_lines = 0

    def count(self) -> int:
        """Read the whole file once: every line decodes, or a DataError says where not."""
        for _ in self:
            pass
        return self.lines

    def __iter__(self) -> Iterator[str]:
        self.lines = self.invalid_lines = 0
        try:
            opener = gzip.open if self.path.suffix == ".gz" else open
            with opener(self.path, "rb") as stream:
                reader = LineReader(stream, str(self.path), self.errors)
                for line in reader:
                    self.lines += 1
                    self.invalid_lines = reader.invalid_lines
                    yield line
        except (EOFError, OSError, zlib.error) as err:
            raise read_error(self.path, err) from None


def decode_lines(raw: bytes, name: str, errors: str = "replace") -> TextFile:
    """Split bytes into lines and decode each as UTF-8 under the given error policy."""
    check_error_policy(errors)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()  # the final newline ends the last line; it does not start a new one
    lines: list[str] = []
    invalid = 0
    for number, chunk in enumerate(chunks, start=1):
        line, bad = decode_line(chunk, name, number, errors)
        lines.append(line)
        invalid += bad
    return TextFile(lines, invalid)


def corpus_path(prefix: str | Path, lang: str) -> Path:
    """`corpus/train` + `de` -> `corpus/train.de`, or `corpus/train.de.gz` if only that exists."""
    plain = Path(f"{prefix}.{lang}")
    gz = Path(f"{prefix}.{lang}.gz")
    if not plain.exists() and gz.exists():
        return gz
    return plain


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (links and `..` included); False if one is missing."""
    try:
        return Path(a).samefile(b)
    except OSError:
        return False
