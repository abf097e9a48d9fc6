"""CSV tables of the data layouts (``split.csv``, ``patients.csv``, ``slice_labels.csv``, ``manifest.csv``).

Read as spreadsheets save them: UTF-8 with or without a byte-order mark, comma-, semicolon- or tab-separated
(decided from the header line), any line endings; header names stripped of surrounding spaces."""

from __future__ import annotations

import csv
from pathlib import Path

from covidct.errors import InputError

DELIMITERS = ",;\t"


def read_table(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a CSV with a header that names every ``required`` column (else one clear error)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = fh.readline()
            counts = {d: header.count(d) for d in DELIMITERS}
            delimiter = max(DELIMITERS, key=lambda d: (counts[d], d == ","))   # a one-column table: comma
            fh.seek(0)   # the decoder is reset: the byte-order mark is skipped again
            reader = csv.DictReader(fh, delimiter=delimiter)
            reader.fieldnames = [name.strip() for name in (reader.fieldnames or [])]
            missing = [c for c in required if c not in reader.fieldnames]
            if missing:
                raise InputError(path, f"needs the column(s) {', '.join(repr(c) for c in missing)}"
                                       f" (header: {', '.join(reader.fieldnames) or 'none'})")
            return list(reader)
    except UnicodeDecodeError:
        raise InputError(path, "is not UTF-8 text") from None
    except csv.Error as exc:
        raise InputError(path, f"unreadable CSV ({exc})") from None
