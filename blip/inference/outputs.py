"""Where inference results go: rows streamed to a JSONL or CSV file (by its extension) and flushed as they come,
so a run killed at any point keeps every finished row, and a rerun with the same output skips what is done.

Under torchrun each rank appends to its own part file (`OUT.rank-R.part`); at the end rank 0 merges the parts
into OUT in input order and removes them. A part left by a killed run is read as done by the next run.
"""
from __future__ import annotations

import csv
import glob
import json
import os


def fmt(path) -> str:
    """'jsonl' or 'csv' from the output's extension (.jsonl, .json, .ndjson, .csv)."""
    low = str(path).lower()
    if low.endswith(".csv"):
        return "csv"
    if low.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ValueError(f"{path}: the output's extension picks its format: .jsonl or .csv")


def _cell(value):
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def _uncell(value: str):
    if value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_rows(path) -> list[dict]:
    """Every complete row of an output file (a last line cut by a kill is left out). CSV values are strings
    (lists and dicts read back from their JSON)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    if not text.endswith("\n"):  # the last row was being written when the run died
        text = text[:text.rfind("\n") + 1]
    if fmt(path) == "jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not JSON ({e.msg}); not an output of this tool?") from None
        return rows
    return [{k: _uncell(v) for k, v in r.items()} for r in csv.DictReader(text.splitlines())]


def _cut_partial_line(path):
    """Drop a last line without its newline (a row cut by a kill), so appending starts on a fresh line."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


class RowWriter:
    """Appends rows to `path` (JSONL or CSV), flushing after every `write`. CSV columns are `fields`."""

    def __init__(self, path, fields: list[str]):
        self.path, self.fields, self.format = str(path), list(fields), fmt(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        _cut_partial_line(self.path)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self.f = open(self.path, "a", newline="", encoding="utf-8")
        if self.format == "csv":
            self.csv = csv.DictWriter(self.f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                self.csv.writeheader()

    def write(self, rows: list[dict]):
        for r in rows:
            if self.format == "csv":
                self.csv.writerow({k: _cell(v) for k, v in r.items()})
            else:
                self.f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


def part_path(output, rank: int) -> str:
    stem, ext = os.path.splitext(str(output))
    return f"{stem}.rank-{rank}.part{ext}"


def part_files(output) -> list[str]:
    stem, ext = os.path.splitext(str(output))
    return sorted(glob.glob(glob.escape(stem) + ".rank-*.part" + ext))


def done_rows(output) -> list[dict]:
    """Rows already written: the output and any part files a killed distributed run left."""
    rows = read_rows(output)
    for p in part_files(output):
        rows += read_rows(p)
    return rows


def merge_parts(output, fields, order_key, row_key):
    """Rank 0, after every rank finished: the output's rows and every part's, deduplicated by `row_key`,
    sorted by `order_key` (the input order), written atomically to the output; the parts removed."""
    parts = part_files(output)
    if not parts:
        return
    seen, rows = set(), []
    for r in read_rows(output) + [r for p in parts for r in read_rows(p)]:
        k = row_key(r)
        if k not in seen:
            seen.add(k)
            rows.append(r)
    rows.sort(key=order_key)
    stem, ext = os.path.splitext(str(output))
    tmp = f"{stem}.merging{ext}"
    if os.path.exists(tmp):
        os.remove(tmp)
    w = RowWriter(tmp, fields)
    w.write(rows)
    w.close()
    os.replace(tmp, output)
    for p in parts:
        os.remove(p)


def side_path(output, what: str = "summary") -> str:
    """FILE.summary.json beside the output, after its whole name (`caps.jsonl.summary.json`), so outputs that
    differ only in their extension keep their own."""
    return f"{output}.{what}.json"


def differing(old: dict, new: dict) -> list[str]:
    """The request fields whose values differ (absent on one side counts)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def check_request(output, request: dict | None) -> None:
    """Refuse to add rows to an output made by another request (another checkpoint, task, text, decoding,
    precision...): its rows would mix two requests' answers under one name. The request is read from the
    output's side file, which every run writes before its first row."""
    from ..errors import OutputExistsError
    earlier = os.path.exists(output) or part_files(output) or os.path.isdir(f"{output}.chunks")  # embed's chunks
    if request is None or not earlier:
        return
    side = side_path(output)
    try:
        with open(side, encoding="utf-8") as f:
            old = json.load(f).get("request")
    except (OSError, ValueError):
        old = None
    if old is None:
        import logging
        logging.getLogger(__name__).warning("%s: no request recorded in %s (an older blip wrote it?): its rows are "
                                            "taken as this request's", output, side)
        return
    diff = differing(old, json.loads(json.dumps(request)))  # as the side file holds it (tuples are lists)
    if diff:
        raise OutputExistsError(f"{output} holds rows of another request ({', '.join(diff)} differ): "
                                f"--overwrite moves it aside, or give another -o")


def write_side_file(output, record: dict) -> None:
    """The side file, written whole or not at all."""
    path = side_path(output)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def move_output_aside(output) -> str | None:
    """--overwrite: the output, its side file, the parts and chunks a killed run left, moved aside together under
    one new name (nothing deleted); returns that name, or None when there was nothing."""
    from ..models.checkpoint import move_aside
    if not os.path.exists(output):
        for p in part_files(output):  # a killed torchrun run that never merged
            move_aside(p)
        return None
    output = str(output)
    aside = str(move_aside(output))
    siblings = [(side_path(output), side_path(aside)), (output + ".chunks", aside + ".chunks")]
    if output.endswith(".npy"):  # the ids and text features beside a .npy gallery
        siblings += [(output[:-4] + s, aside[:-4] + s) for s in (".ids.json", ".text.npy")]
    siblings += [(p, part_path(aside, int(p.rsplit(".rank-", 1)[1].split(".")[0]))) for p in part_files(output)]
    for old, new in siblings:
        if os.path.exists(old):
            os.rename(old, new)
    return aside
