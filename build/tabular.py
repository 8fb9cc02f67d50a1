"""Columns of a data file: CSV (or TSV), JSON Lines or Parquet, read with the row of every value kept
for error messages.

Every problem with a file is a :class:`DataFileError` (a ``ValueError``) that names the file and,
where it is about one value, its line (CSV, JSON Lines) or row (Parquet): a missing file or column,
text that is not UTF-8, a line that is not JSON, a record without the column.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class DataFileError(ValueError):
    """A data file that cannot be used as it is; the message names the file and the line or row."""


@dataclass(frozen=True)
class Table:
    """Some columns of a file: ``columns[name][i]`` is row i's value, found at ``places[i]`` ("line 3")."""

    path: Path
    columns: dict[str, list[Any]]
    places: list[str]

    def __len__(self) -> int:
        return len(self.places)

    def where(self, row: int) -> str:
        return f"{self.path}, {self.places[row]}"


def write_columns(path: Path, columns: dict[str, list[Any]]) -> Path:
    """``columns`` (name -> a value per row) as a CSV, TSV, JSON Lines or Parquet file, by the suffix."""
    path = Path(path)
    kind = file_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(zip(*columns.values(), strict=True))
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), path)
    elif kind == "jsonl":
        path.write_text(
            "".join(json.dumps(dict(zip(columns, row, strict=True))) + "\n" for row in rows), encoding="utf-8"
        )
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if kind == "tsv" else ",")
            writer.writerow(columns)
            writer.writerows(rows)
    return path


def file_format(path: Path) -> str:
    """``csv``, ``tsv``, ``jsonl`` or ``parquet``, from the file name's suffix."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataFileError(
            f"{path}: unknown data file type {suffix!r}; use one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[suffix]


def read_columns(path: Path | str, required: Sequence[str], optional: Sequence[str] = ()) -> Table:
    """The ``required`` columns of a data file (each must exist) and those of ``optional`` it has."""
    path = Path(path)
    optional = [name for name in optional if name not in required]
    if not path.is_file():
        raise DataFileError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    kind = file_format(path)
    if kind == "parquet":
        return _read_parquet(path, required, optional)
    text = _utf8_text(path)
    if kind == "jsonl":
        return _read_jsonl(path, text, required, optional)
    return _read_delimited(path, text, "\t" if kind == "tsv" else ",", required, optional)


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as spreadsheet programs write one, is not data
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataFileError(
            f"{path}, line {line}: not valid UTF-8 ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None


def _missing_columns(path: Path, present: Sequence[str], required: Sequence[str]) -> None:
    missing = [name for name in required if name not in present]
    if missing:
        raise DataFileError(
            f"{path}: no column {', '.join(map(repr, missing))}; "
            f"its columns are {', '.join(map(repr, present))}"
        )


def _read_delimited(
    path: Path, text: str, delimiter: str, required: Sequence[str], optional: Sequence[str]
) -> Table:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    present = reader.fieldnames or []
    _missing_columns(path, present, required)
    names = [*required, *(name for name in optional if name in present)]
    columns: dict[str, list[Any]] = {name: [] for name in names}
    places = []
    try:
        for record in reader:  # the reader skips blank lines itself
            place = f"line {reader.line_num}"
            for name in names:
                if record.get(name) is None:
                    raise DataFileError(f"{path}, {place}: has fewer fields than the header (no {name!r})")
                columns[name].append(record[name])
            places.append(place)
    except csv.Error as error:
        raise DataFileError(f"{path}, line {reader.line_num}: {error}") from None
    return Table(path, columns, places)


def _read_jsonl(path: Path, text: str, required: Sequence[str], optional: Sequence[str]) -> Table:
    columns: dict[str, list[Any]] = {name: [] for name in required}
    present: set[str] = set()
    places = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFileError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataFileError(
                f"{path}, line {number}: a JSON object is expected, not {type(record).__name__}"
            )
        missing = [name for name in required if name not in record]
        if missing:
            raise DataFileError(
                f"{path}, line {number}: no {', '.join(map(repr, missing))}; "
                f"it holds {', '.join(map(repr, record))}"
            )
        present.update(record)
        for name in required:
            columns[name].append(record[name])
        for name in optional:
            columns.setdefault(name, []).append(record.get(name))
        places.append(f"line {number}")
    for name in optional:  # a column no record has is absent, as in the other formats
        if name not in present:
            columns.pop(name, None)
    return Table(path, columns, places)


def _read_parquet(path: Path, required: Sequence[str], optional: Sequence[str]) -> Table:
    import pyarrow.parquet as pq

    try:
        present = pq.read_schema(path).names
    except Exception as error:  # pyarrow raises its own ArrowInvalid and OSError types
        raise DataFileError(f"{path}: not a Parquet file ({error})") from None
    _missing_columns(path, present, required)
    names = [*required, *(name for name in optional if name in present)]
    table = pq.read_table(path, columns=names)
    columns = {name: table.column(name).to_pylist() for name in names}
    for name, values in columns.items():  # binary columns come back as bytes: text must be UTF-8
        for row, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    values[row] = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataFileError(
                        f"{path}, row {row + 1}: column {name!r} is not valid UTF-8 ({error.reason})"
                    ) from None
    return Table(path, columns, [f"row {row + 1}" for row in range(table.num_rows)])
