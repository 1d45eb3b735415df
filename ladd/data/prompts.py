"""Reading prompt files for `ladd precompute`: one list of prompts in sample order, bad input named.

    .txt       one prompt per line
    .jsonl     one JSON object per line, field "prompt"
    .csv       a header row with a column "prompt"
    .parquet   a column "prompt" (needs `pip install pyarrow`)

.jsonl, .csv and .parquet may also give a prompt its image size, as integer fields (columns) "width"
and "height" in pixels — both or neither; a prompt without them gets a bucket from the seeded draw
(`ladd.data.buckets`).

Sample i is the i-th non-empty prompt of the file: empty (or whitespace-only) lines and prompts are
skipped and counted, never turned into an empty-caption sample. Bytes that are not UTF-8 stop the read
with the line number, so that a half-decoded caption never reaches the teacher. Over-long prompts are
counted with the pipeline's tokenizer by `ladd.models.text.token_lengths`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


class PromptFileError(ValueError):
    """A prompt file that cannot be read as asked; the message is one line naming file and line."""


@dataclass(kw_only=True)
class PromptFile:
    prompts: list[str]  # in sample order: sample i <-> prompts[i]
    skipped_empty: int  # empty or whitespace-only lines / prompts that were left out
    source: str  # the file they were read from
    sizes: list[tuple[int, int] | None] | None = None  # (width, height) per prompt; None: the file gives none
    lines: list[int] | None = None  # the 1-based line (row) each prompt came from, for messages


def read_prompts(path: str | Path) -> PromptFile:
    """All non-empty prompts of a .txt/.jsonl/.csv/.parquet file, in file order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PromptFileError(f"{path}: unknown prompt file type {suffix!r} (expected one of {', '.join(FORMATS)})")
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    if suffix == ".parquet":
        raw = _read_parquet(path)
    else:
        text = _utf8_text(path)
        raw = {".txt": _from_txt, ".jsonl": _from_jsonl, ".csv": _from_csv}[suffix](path, text)
    first_line = 2 if suffix in (".csv", ".parquet") else 1  # a csv's header is line 1; parquet rows as csv
    kept = [(k, p, size) for k, (p, size) in enumerate(raw) if p.strip()]
    if not kept:
        raise PromptFileError(f"{path}: no prompts (all {len(raw)} entries are empty)")
    sizes = [size for _, _, size in kept]
    return PromptFile(prompts=[p for _, p, _ in kept], skipped_empty=len(raw) - len(kept), source=str(path),
                      sizes=sizes if any(s is not None for s in sizes) else None,
                      lines=[k + first_line for k, _, _ in kept])


def _utf8_text(path: Path) -> str:
    """The file decoded; the first invalid byte is reported with its 1-based line number."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise PromptFileError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})"
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first prompt


def _lines(text: str) -> list[str]:
    # Split on "\n" only (str.splitlines would also split prompts at U+2028 and friends); a final
    # newline does not make an extra empty line.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


Entry = tuple[str, tuple[int, int] | None]  # a prompt and its (width, height), if the file gives one


def _size(path: Path, where: int, width, height) -> tuple[int, int] | None:
    """A prompt's (width, height) from its fields; both missing is None, anything else must be two
    positive integers."""
    missing = [v is None or v == "" for v in (width, height)]
    if all(missing):
        return None
    if any(missing):
        given = "width" if missing[1] else "height"
        raise PromptFileError(f"{path}:{where}: \"{given}\" without \"{'height' if given == 'width' else 'width'}\" "
                              "(give both, or neither to draw a bucket)")
    out = []
    for name, v in (("width", width), ("height", height)):
        n = None
        if isinstance(v, int) and not isinstance(v, bool):
            n = v
        elif isinstance(v, float) and v.is_integer():
            n = int(v)
        elif isinstance(v, str) and v.strip().isdigit():
            n = int(v)
        if n is None or n < 1:
            raise PromptFileError(f"{path}:{where}: \"{name}\" is {v!r}, not a positive integer number of pixels")
        out.append(n)
    return out[0], out[1]


def _from_txt(path: Path, text: str) -> list[Entry]:
    return [(line, None) for line in _lines(text)]


def _from_jsonl(path: Path, text: str) -> list[Entry]:
    out = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            out.append(("", None))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise PromptFileError(f"{path}:{lineno}: no field \"prompt\"")
        if not isinstance(obj["prompt"], str):
            raise PromptFileError(f"{path}:{lineno}: field \"prompt\" is {type(obj['prompt']).__name__}, not a string")
        out.append((obj["prompt"], _size(path, lineno, obj.get("width"), obj.get("height"))))
    return out


def _from_csv(path: Path, text: str) -> list[Entry]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise PromptFileError(f"{path}:1: no column \"prompt\" in the header {reader.fieldnames}")
    return [(row["prompt"] or "", _size(path, reader.line_num, row.get("width"), row.get("height")))
            for row in reader]


def _read_parquet(path: Path) -> list[Entry]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptFileError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise PromptFileError(f"{path}: no column \"prompt\" (columns: {table.column_names})")
    prompts = ["" if p is None else str(p) for p in table.column("prompt").to_pylist()]
    sides = [table.column(c).to_pylist() if c in table.column_names else [None] * len(prompts)
             for c in ("width", "height")]
    return [(p, _size(path, k + 2, w, h)) for k, (p, w, h) in enumerate(zip(prompts, *sides))]
