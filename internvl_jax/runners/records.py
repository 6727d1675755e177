"""Input files -> requests: one request per record, in input order, bad records kept (with their error).

`internvl-jax batch` reads JSONL, one object a line:
  {"id": ..., "messages": [...transformers-style chat messages...]}
  {"id": ..., "prompt": "...", "images": [path | URL | data URI, ...], "video": path, "system": "..."}
Benchmark files (`internvl-jax eval`) are read by `read_table`: VLMEvalKit's TSV layout or JSONL rows.

A record that cannot be used (not JSON, no id, neither messages nor prompt, a duplicate id) still becomes a
request, one whose `error` names the record and field; the runner writes it out as a failed line.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pandas' default NA strings: VLMEvalKit reads benchmark TSVs with `pd.read_csv(f, sep='\t')`, so a cell
# holding one of these is missing there (an option "None" is dropped from the prompt); we do the same.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
_TRUE, _FALSE = frozenset({"True", "TRUE", "true"}), frozenset({"False", "FALSE", "false"})


@dataclass(frozen=True)
class Request:
    """One record to answer. `conversation` is what `apply_chat_template` takes; None when `error` is set."""

    row: int  # position among the input's records, 0-based: the merge order and the sharding key
    id: Any  # the record's own id as given (str or int); None when it has none
    where: str  # "line 7" / "row 7": for messages
    conversation: list[dict] | None = None
    error: str | None = None
    # The record's own generation options (RECORD_OPTIONS, eval profiles' max_new_tokens), over the command's.
    generation: Mapping[str, Any] = field(default_factory=dict)
    max_patches: int | None = None  # the record's own tile budget per image (eval profiles)

    def label(self) -> str:
        return f"record {self.id!r} ({self.where})" if self.id is not None else f"record at {self.where}"


def id_key(value: Any) -> str:
    """Ids compare by their JSON text, so 1 and "1" stay different records."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# ----- JSONL prompts -----
def iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed object or None, error) for every non-blank line."""
    number = 0
    # utf-8-sig: a byte-order mark (Windows editors, Excel exports) is not part of the first record.
    with open(path, encoding="utf-8-sig") as f, _text_file(path, "JSONL", lambda: number):
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as e:
                yield number, None, f"line {number} is not valid JSON: {e}"


@contextlib.contextmanager
def _text_file(path: Path, kind: str, lines_read: Callable[[], int]) -> Iterator[None]:
    """Bytes that are not UTF-8 mean the file is not text at all (an image given as input, say): the whole
    file is refused, by name, in one line."""
    try:
        yield
    except UnicodeDecodeError as e:
        where = f"after line {lines_read()}" if lines_read() else "at the start"
        raise ValueError(f"{path} is not a UTF-8 text file ({e.reason} {where}); expected {kind}") from e
    except csv.Error as e:
        raise ValueError(f"{path}: line {lines_read()}: {e}; expected {kind}") from e


def _local(source: Any, base: Path) -> Any:
    """A relative path that is not found from the working directory but is next to the input file."""
    if not isinstance(source, str) or "://" in source[:16] or source.startswith("data:") or len(source) > 4096:
        return source
    p = Path(source)
    if p.is_absolute() or p.exists():
        return source
    beside = base / p
    return str(beside) if beside.exists() else source


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def conversation_from_fields(obj: Mapping[str, Any], base: Path) -> list[dict]:
    """The chat messages of one JSONL record; ValueError names the field that is wrong."""
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list of {'role', 'content'} messages")
        out = []
        for message in messages:
            if isinstance(message, Mapping) and isinstance(message.get("content"), list):
                content = []
                for block in message["content"]:
                    if isinstance(block, Mapping):
                        block = {k: (_local(v, base) if k in ("url", "path", "image", "video") else v)
                                 for k, v in block.items()}
                    content.append(block)
                message = {**message, "content": content}
            out.append(message)
        return out
    if "prompt" not in obj:
        raise ValueError("the record has neither 'messages' nor 'prompt'")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise ValueError(f"field 'prompt' must be a string, got {type(prompt).__name__}")
    content: list[dict] = []
    for i, image in enumerate(_as_list(obj.get("images", []) or [])):
        if not isinstance(image, str):
            raise ValueError(f"field 'images'[{i}] must be a path, URL or data URI string")
        content.append({"type": "image", "url": _local(image, base)})
    if obj.get("image") is not None:  # a single image under the singular name
        content.insert(0, {"type": "image", "url": _local(obj["image"], base)})
    if obj.get("video") is not None:
        if not isinstance(obj["video"], str):
            raise ValueError("field 'video' must be a path or URL string")
        content.append({"type": "video", "url": _local(obj["video"], base)})
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "user", "content": content}]
    if obj.get("system") is not None:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": str(obj["system"])}]})
    return messages


# Generation options a `batch` record may carry, with their JSON types.
RECORD_OPTIONS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_p": (int, float), "top_k": (int,),
    "seed": (int,), "do_sample": (bool,)}


def record_generation(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The record's generation options, checked as `SamplingConfig` checks the command's; ValueError names the
    field."""
    from internvl_jax.engine.sampling import SamplingConfig

    options = {}
    for key, kinds in RECORD_OPTIONS.items():
        if key not in obj or obj[key] is None:
            continue
        value = obj[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ValueError(f"field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        options[key] = value
    try:
        SamplingConfig(do_sample=bool(options.get("do_sample", False))).update(**options)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        raise ValueError(f"field {name!r} {rest}") from None
    return options


def read_prompts(path: str | Path) -> list[Request]:
    """Every record of a JSONL prompt file, in order."""
    path = Path(path)
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for number, obj, error in iter_jsonl(path):
        row, where = len(requests), f"line {number}"
        if error is not None:
            requests.append(Request(row, None, where, error=error))
            continue
        if not isinstance(obj, Mapping):
            requests.append(Request(row, None, where, error=f"{where}: expected a JSON object"))
            continue
        rid = obj.get("id")
        if rid is None or not isinstance(rid, (str, int)) or isinstance(rid, bool):
            requests.append(Request(row, None, where, error=f"{where}: missing field 'id' (a string or integer)"))
            continue
        req = Request(row, rid, where)
        key = id_key(rid)
        if key in seen:
            requests.append(Request(row, rid, where, error=f"{req.label()}: duplicate id (first on line {seen[key]})"))
            continue
        seen[key] = number
        try:
            conversation = conversation_from_fields(obj, path.parent)
            generation = record_generation(obj)
        except ValueError as e:
            requests.append(Request(row, rid, where, error=f"{req.label()}: {e}"))
            continue
        requests.append(Request(row, rid, where, conversation, generation=generation))
    return requests


# ----- benchmark tables -----
def _parse_cell(text: str) -> str | None:
    return None if text in PANDAS_NA else text


def _column_type(values: list[str | None]) -> str:
    """pandas' type inference for one column: bool, int, float (ints with a missing value become float),
    else str. A prompt built from a numeric column shows what pandas would show ('3.0' when a cell is empty)."""
    present = [v for v in values if v is not None]
    if not present:
        return "str"
    if all(v in _TRUE or v in _FALSE for v in present):
        return "bool" if len(present) == len(values) else "str"
    if all(_number(v, int) for v in present):
        return "int" if len(present) == len(values) else "float"
    if all(_number(v, float) for v in present):
        return "float"
    return "str"


def _convert(value: str | None, kind: str) -> Any:
    if value is None:
        return None
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        return value in _TRUE
    return value


@dataclass(frozen=True)
class TableRow:
    """One benchmark row: its fields, or why it could not be read."""

    where: str
    fields: dict[str, Any] | None
    error: str | None = None


def _number(text: str, kind: type) -> bool:
    if "_" in text:  # Python's int()/float() accept digit separators; pandas does not
        return False
    try:
        kind(text)
        return True
    except ValueError:
        return False


def read_tsv(path: Path) -> list[TableRow]:
    # Base64 images are far longer than csv's default field limit (128 KiB).
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:  # a byte-order mark is not part of the header
        reader = csv.reader(f, delimiter="\t")
        with _text_file(path, "a tab-separated file", lambda: reader.line_num):
            return _table_rows(path, reader)


def _table_rows(path: Path, reader: Iterator[list[str]]) -> list[TableRow]:
    """The rows of a TSV `reader`, typed per column as pandas types them."""
    header = next((cells for cells in reader if any(c.strip() for c in cells)), None)  # pandas skips blank lines
    if header is None:
        return []
    if len(header) < 2:
        # A benchmark needs at least an index and a question column: one column means no tab in the line.
        commas = " (but commas: a comma-separated file?)" if "," in header[0] else ""
        raise ValueError(f"{path} does not look tab-separated: its header line {header[0][:60]!r} has no "
                         f"tab{commas}")
    raw, errors = [], {}
    for cells in reader:
        if not any(c.strip() for c in cells):
            continue  # pandas skips blank lines
        if len(cells) > len(header):
            errors[len(raw)] = f"has {len(cells)} cells but the header has {len(header)}"
        cells = (cells + [""] * (len(header) - len(cells)))[: len(header)]
        raw.append([_parse_cell(c) for c in cells])
    kinds = [_column_type([r[j] for r in raw]) for j in range(len(header))]
    rows = []
    for k, r in enumerate(raw):
        where = f"row {k + 1}"
        if k in errors:
            rows.append(TableRow(where, None, f"{where} {errors[k]}"))
            continue
        # Image cells stay text (a base64 string never needs to be a number).
        rows.append(TableRow(where, {h: (_convert(r[j], kinds[j]) if h not in ("image", "image_path") else r[j])
                                     for j, h in enumerate(header)}))
    return rows


def read_table(path: str | Path) -> list[TableRow]:
    """Rows of a benchmark file: VLMEvalKit TSV (`.tsv`), Excel (`.xlsx`, as VLMEvalKit writes predictions) or
    JSONL (anything else)."""
    path = Path(path)
    if path.suffix.lower() == ".tsv":
        return read_tsv(path)
    if path.suffix.lower() == ".xlsx":
        return read_xlsx(path)
    rows: list[TableRow] = []
    for number, obj, error in iter_jsonl(path):
        where = f"line {number}"
        if error is not None:
            rows.append(TableRow(where, None, error))
        elif not isinstance(obj, Mapping):
            rows.append(TableRow(where, None, f"{where}: expected a JSON object"))
        else:
            rows.append(TableRow(where, dict(obj)))
    return rows


def read_xlsx(path: Path) -> list[TableRow]:
    """Rows of an Excel sheet (VLMEvalKit writes its predictions as .xlsx), typed as openpyxl reads them;
    pandas' NA strings are missing, as `pd.read_excel` reads them."""
    try:
        import openpyxl
    except ImportError:
        raise ValueError(f"{path}: reading .xlsx needs openpyxl: pip install 'internvl-jax[xlsx]' (or give the "
                         "predictions as .tsv)") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # noqa: BLE001 (zipfile / openpyxl raise many types for a file that is not xlsx)
        raise ValueError(f"{path} is not a readable .xlsx file: {type(e).__name__}: {e}") from None
    try:
        lines = book.worksheets[0].iter_rows(values_only=True)
        header = [str(h) for h in next(lines, ())]
        rows = []
        for k, values in enumerate(lines):
            if all(v is None for v in values):
                continue
            cells = [_parse_cell(v) if isinstance(v, str) else v for v in values]
            rows.append(TableRow(f"row {k + 1}", dict(zip(header, cells, strict=False))))
        return rows
    finally:
        book.close()
