"""Reading prompt files for `ladd precompute`: one list of prompts in sample order, bad input named.

    .txt       one prompt per line
    .jsonl     one JSON object per line, field "prompt"
    .csv       a header row with a column "prompt"
    .parquet   a column "prompt" (needs `pip install pyarrow`)

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
    prompts = [p for p in raw if p.strip()]
    if not prompts:
        raise PromptFileError(f"{path}: no prompts (all {len(raw)} entries are empty)")
    return PromptFile(prompts=prompts, skipped_empty=len(raw) - len(prompts), source=str(path))


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


def _from_txt(path: Path, text: str) -> list[str]:
    return _lines(text)


def _from_jsonl(path: Path, text: str) -> list[str]:
    out = []
    for lineno, line in enumerate(_lines(text), start=1):
        if not line.strip():
            out.append("")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise PromptFileError(f"{path}:{lineno}: no field \"prompt\"")
        if not isinstance(obj["prompt"], str):
            raise PromptFileError(f"{path}:{lineno}: field \"prompt\" is {type(obj['prompt']).__name__}, not a string")
        out.append(obj["prompt"])
    return out


def _from_csv(path: Path, text: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise PromptFileError(f"{path}:1: no column \"prompt\" in the header {reader.fieldnames}")
    return [row["prompt"] or "" for row in reader]


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PromptFileError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise PromptFileError(f"{path}: no column \"prompt\" (columns: {table.column_names})")
    return ["" if p is None else str(p) for p in table.column("prompt").to_pylist()]
