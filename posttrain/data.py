"""Training rows in, token examples out: load, validate, tokenize. Batching: loader.py, re-exported here.

    rows = load_rows("data/chats.jsonl")                 # or a directory, .json, .parquet, a hub name
    validate_rows(rows)                                 # every problem named file:row: field: rule
    examples = tokenize_rows(rows, tok, max_seq_len=1024)   # Example(ids, loss_mask), counts reported
    loader = DataLoader(examples, batch_size=4, max_seq_len=1024, pad_id=tok.pad_id, seed=0)

Two row formats, chosen per row:
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, checked with the
  tokenizer's own chat rules (optional system first, then user/assistant alternating from user);
- prompt/response: `{"prompt": str, "response": str, "system": str (optional)}`.
Other columns are kept (rewards read them). For SFT (`require_reply=True`) the last turn must be the
model's; for prompt sets (`require_reply=False`) a chat must end with a user turn.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import urlparse

from .errors import UserError
from .loader import IGNORE, Batch, DataLoader, DataLoaderState, collate, epoch_order, pack  # noqa: F401 (re-export)
from .tokenizer import IMAGE_TOKEN_ID, Tokenizer, _turns as chat_turns

if TYPE_CHECKING:
    from .images import ImageConfig

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
MAX_PROBLEMS = 10  # problems listed in one validation error; the rest are counted
LOCAL_FIX = "fix: give a local .jsonl, .json or .parquet file (or a directory of them)"


class Rows(list):
    """Dataset rows (dicts) that remember where each came from: `where[i]` is "file:line" or "file:row"."""

    def __init__(self, rows: Iterable[dict] = (), where: Iterable[str] = ()):
        super().__init__(rows)
        self.where = list(where)
        assert len(self.where) == len(self), f"{len(self.where)} origins for {len(self)} rows"


def origin(rows: Sequence[dict], i: int) -> str:
    """How errors name row i: "file:line" for rows from load_rows, else "row <i+1>"."""
    where = getattr(rows, "where", None)
    return where[i] if where else f"row {i + 1}"


# ----------------------------------------------------------------------------- loading


def load_rows(source: str | os.PathLike, split: str = "train",
              registry: Mapping[str, Callable[[], list[dict]]] | None = None) -> Rows:
    """Rows of a dataset: a registered name, a local file or directory, or a hub dataset (when online).

    registry: built-in generators by name (e.g. `data.BUNDLED`), looked up first.
    Local files: .jsonl (one object per line; errors give the line), .json (a list of objects, or
    JSON Lines), .parquet. A directory: all such files under it, sorted by path; if some have the
    split in their path (`train-0000.parquet`, `train/a.jsonl`) only those. `split` picks nothing else
    locally. Hub: "owner/name" or "owner/name:config", loaded with `datasets.load_dataset(split=split)`.
    """
    name = str(source)
    if registry is not None and name in registry:
        rows = list(registry[name]())
        if not rows:
            raise UserError(f"built-in dataset '{name}' produced no rows")
        return Rows(rows, (f"<{name}>:{i + 1}" for i in range(len(rows))))
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_dir(path, split)
    if path.is_file():
        return _load_file(path)
    if path.suffix in SUFFIXES or name.startswith((".", "/", "~")) or name.count("/") > 1:
        known = f"; built-in names: {', '.join(registry)}" if registry else ""
        raise UserError(f"data source '{name}' does not exist ({LOCAL_FIX}{known})")
    return _load_hub(name, split)


def _load_dir(path: Path, split: str) -> Rows:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise UserError(f"directory {path} has no {', '.join(SUFFIXES)} files ({LOCAL_FIX})")
    of_split = [p for p in files if any(part.split("-")[0].split(".")[0] == split
                                        for part in p.relative_to(path).parts)]
    rows = Rows()
    for p in of_split or files:
        part = _load_file(p)
        rows += part
        rows.where += part.where
    return rows


def _load_file(path: Path) -> Rows:
    if path.suffix not in SUFFIXES:
        raise UserError(f"{path}: unsupported file type '{path.suffix}' ({LOCAL_FIX})")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # ships with datasets
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path}: not a readable parquet file ({e}) (fix: re-export it)") from None
        where = (f"{path}:row {i + 1}" for i in range(len(rows)))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}) (fix: save it as UTF-8)") from None
        rows, where = _parse_json(path, text)
    rows = Rows(rows, where)
    if not rows:
        raise UserError(f"{path} is empty: it has no rows (fix: point at the file that holds the data)")
    return rows


def _parse_json(path: Path, text: str) -> tuple[list, list[str]]:
    """A JSON array of objects, or JSON Lines (one object per non-blank line, 1-based line numbers)."""
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}) "
                            "(fix: repair the file, or write one JSON object per line as .jsonl)") from None
        return rows, [f"{path}:row {i + 1}" for i in range(len(rows))]
    # Lines are split on "\n" only: str.splitlines also splits on U+2028 and others, which JSON strings
    # may hold unescaped, and would shift the line numbers in errors.
    lines = text.split("\n")
    if path.suffix == ".json" and sum(bool(line.strip()) for line in lines) > 1:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON Lines, or broken: the line-by-line pass below names the line
        if isinstance(whole, dict):
            raise UserError(f"{path} holds one JSON object (keys {sorted(whole)[:5]}), not rows (fix: write a "
                            "list of row objects, or one row object per line as .jsonl)")
    rows, where, bad = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
            where.append(f"{path}:{n}")
        except json.JSONDecodeError as e:
            bad.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
    if bad:
        raise UserError(_problems(f"{path} has {len(bad)} malformed JSON line(s)", bad,
                                  "fix: each line must be one complete JSON object, e.g. "
                                  '{"prompt": "...", "response": "..."}'))
    return rows, where


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub opens; checked first because `datasets` retries for ~25 s offline."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(name: str, split: str) -> Rows:
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    offline_mode = any(f in ("1", "true", "yes", "on") for f in flags)  # datasets then reads its cache
    if not offline_mode and not _hub_reachable():
        raise UserError(f"data source '{name}' is not a local file, and the Hugging Face hub is not reachable "
                        f"to load it as a hub dataset ({LOCAL_FIX}; or set HF_HUB_OFFLINE=1 to use a copy "
                        "already in the datasets cache)")
    import datasets
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # hub, network and cache failures come in many types
        mode = " in offline mode (HF_HUB_OFFLINE)" if offline_mode else ""
        raise UserError(f"could not load hub dataset '{name}' split '{split}'{mode}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''} (fix: check the name, config and split, "
                        f"or {LOCAL_FIX.removeprefix('fix: ')})") from None
    rows = ds.to_list()
    if not rows:
        raise UserError(f"hub dataset '{name}' split '{split}' is empty (fix: pick another split)")
    return Rows(rows, (f"{name}[{split}]:row {i + 1}" for i in range(len(rows))))


# ----------------------------------------------------------------------------- validation


def _problems(head: str, problems: list[str], fix: str = "") -> str:
    shown = problems[:MAX_PROBLEMS]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{head}:\n  " + "\n  ".join(shown) + more + (f"\n({fix})" if fix else "")


def _row_problem(row: Any, require_reply: bool) -> str | None:
    """The first problem of one row as "field: rule (fix: ...)", or None if the row is usable."""
    if not isinstance(row, dict):
        return f"row: must be a JSON object, got {type(row).__name__}"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list):
            return f"messages: must be a list of {{role, content}} messages, got {type(msgs).__name__}"
        if not msgs:
            return "messages: empty conversation (fix: add a user and an assistant message, or drop the row)"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                return f"messages[{i}]: must be an object with 'role' and 'content', got {type(m).__name__}"
            for key in ("role", "content"):
                if key not in m:
                    return f"messages[{i}].{key}: missing (fix: every message needs 'role' and 'content')"
            if not isinstance(m["role"], str):
                return f"messages[{i}].role: must be a string, got {type(m['role']).__name__}"
            if not isinstance(m["content"], (str, list)):
                return (f"messages[{i}].content: must be a string, got {type(m['content']).__name__} "
                        "(fix: quote the text)")
        try:
            turns = chat_turns(msgs)  # the tokenizer's rules: roles, system placement, alternation
        except UserError as e:
            return str(e)
        last = "model" if require_reply else "user"
        if turns[-1][0] != last:
            said = {"model": "assistant", "user": "user"}
            return (f"messages[{len(msgs) - 1}].role: the last turn is '{said[turns[-1][0]]}' but must be "
                    f"'{said[last]}' " + ("for training, so there is a reply to learn (fix: drop the "
                                          "trailing user turn)" if require_reply else
                                          "in a prompt set (fix: drop the trailing assistant turn)"))
        return None
    if "prompt" not in row:
        return (f"row: has neither 'messages' (chat format) nor 'prompt' (prompt/response format); "
                f"its fields are {sorted(row)}")
    for key, needed in (("prompt", True), ("response", require_reply), ("system", False)):
        if row.get(key) is None:  # parquet and hub tables give None for a missing column
            if needed:
                return f"{key}: missing (fix: every row needs 'prompt' and 'response' strings)"
            continue
        if not isinstance(row[key], str):
            return f"{key}: must be a string, got {type(row[key]).__name__} (fix: quote the text)"
        if needed and not row[key].strip():
            return f"{key}: is empty (fix: fill it in or drop the row)"
    return None


def validate_rows(rows: Sequence[dict], require_reply: bool = True) -> None:
    """Raise one UserError listing up to MAX_PROBLEMS problems as "file:row: field: rule (fix)"."""
    problems = []
    for i, row in enumerate(rows):
        if (p := _row_problem(row, require_reply)) is not None:
            problems.append(f"{origin(rows, i)}: {p}")
    if problems:
        raise UserError(_problems(f"{len(problems)} of {len(rows)} data rows are unusable", problems))


def to_messages(row: dict, with_reply: bool = True) -> list[dict]:
    """A validated row as chat messages: prompt/response rows become [system], user[, assistant]."""
    if "messages" in row:
        return row["messages"]
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    msgs.append({"role": "user", "content": row["prompt"]})
    if with_reply:
        msgs.append({"role": "assistant", "content": row["response"]})
    return msgs


# ----------------------------------------------------------------------------- tokenization


class Example(NamedTuple):
    """One tokenized row. loss_mask[i]: ids[i] is a training target (model replies and their <end_of_turn>).
    pixel_values (N, 3, H, W): the row's images and crops in the order of their blocks; None without images."""

    ids: list[int]
    loss_mask: list[bool]
    pixel_values: Any = None


class Examples(list):
    """Examples plus what tokenization did: `rows` in, `dropped` and `truncated` counts, `summary` line,
    and `paired`: the other view of the same rows (the teacher's), when one was asked for."""

    rows: int = 0
    dropped: int = 0
    truncated: int = 0
    paired: list[Example] | None = None

    @property
    def summary(self) -> str:
        return (f"{len(self)} examples from {self.rows} rows; {self.dropped} dropped, "
                f"{self.truncated} truncated")


def has_images(row: dict) -> bool:
    """Whether a row carries images (an images/image column, or image parts in its messages)."""
    from .images import image_parts

    return bool(row.get("images") or row.get("image") is not None or image_parts(row.get("messages") or []))


def tokenize_rows(rows: Sequence[dict], tokenizer: Tokenizer, max_seq_len: int,
                  truncation: Literal["drop", "truncate"] = "drop", require_reply: bool = True,
                  teacher: Callable[[dict], list[dict]] | None = None, key: str = "max_seq_len",
                  images: ImageConfig | None = None) -> Examples:
    """Validate, then tokenize with the chat template; rows longer than max_seq_len are handled by `truncation`.

    drop: the row is skipped. truncate: its first max_seq_len tokens are kept, and it is still
    dropped if no reply token is left (nothing to learn). Counts are on the result and logged.
    Prompt sets (`require_reply=False`) end with the generation prompt and have no loss tokens.

    teacher: row -> the messages another model sees for it (distillation with a context before the
    prompt). Those examples go to `.paired`, one per kept example; each ends with the same reply tokens,
    so their loss positions pair up in order, and a truncated row loses as many tokens on both sides.
    key: the name of max_seq_len in messages (the config key, e.g. data.max_seq_len).
    images: how a multimodal model reads images (images.ImageConfig); rows with images then get their
    pixel values and their image blocks (images.encode_chat). None: a row with images is an error. A
    row whose cut would fall inside or before an image is dropped, whatever `truncation` says.
    """
    if truncation not in ("drop", "truncate"):
        raise UserError(f"truncation must be 'drop' or 'truncate', got {truncation!r}")
    validate_rows(rows, require_reply)
    out = Examples()
    out.rows = len(rows)
    out.paired = [] if teacher is not None else None
    for i, row in enumerate(rows):
        pixels = None
        if has_images(row):
            from .images import encode_chat, row_images

            if images is None:
                raise UserError(f"{origin(rows, i)}: the row has images but the model is text-only; fix: use a "
                                "multimodal model (Gemma 3 4B, 12B, 27B, or model.vision), or drop the images")
            loaded = row_images(row, origin(rows, i))
            enc = encode_chat(tokenizer, to_messages(row, require_reply), loaded, images,
                              add_generation_prompt=not require_reply)
            ids, mask, pixels = list(enc.ids), list(enc.loss_mask), enc.pixel_values
            if teacher is not None:
                t = encode_chat(tokenizer, teacher(row), loaded, images, add_generation_prompt=not require_reply)
                t_ids, t_mask = list(t.ids), list(t.loss_mask)
        else:
            ids, mask = tokenizer.apply_chat_template(to_messages(row, require_reply),
                                                    add_generation_prompt=not require_reply)
            ids, mask = list(ids), list(mask)
            if teacher is not None:
                t = tokenizer.apply_chat_template(teacher(row), add_generation_prompt=not require_reply)
                t_ids, t_mask = list(t.ids), list(t.loss_mask)
        if len(ids) > max_seq_len:
            cuts_an_image = pixels is not None and IMAGE_TOKEN_ID in ids[max_seq_len - 1:]
            if truncation == "drop" or cuts_an_image or (require_reply and not any(mask[:max_seq_len])):
                out.dropped += 1
                continue
            cut = len(ids) - max_seq_len
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            if teacher is not None:
                t_ids, t_mask = t_ids[:-cut], t_mask[:-cut]
            out.truncated += 1
        out.append(Example(ids, mask, pixels))
        if teacher is not None:
            if sum(mask) != sum(t_mask):
                raise UserError(f"row {i}: the teacher's view has another reply than the student's; fix: let the teacher's "
                                "messages differ only before the reply")
            out.paired.append(Example(t_ids, t_mask, pixels))
    if not out:
        raise UserError(f"all {len(rows)} rows are longer than {key}={max_seq_len} tokens "
                        f"(fix: raise {key}, or truncate instead of dropping)")
    (log.warning if out.dropped or out.truncated else log.info)(
        "%s (longer than %s=%d, truncation=%s)", out.summary, key, max_seq_len, truncation)
    return out


__all__ = [
    "Rows", "Example", "Examples", "load_rows", "validate_rows", "to_messages", "tokenize_rows", "origin",
    "IGNORE", "Batch", "DataLoader", "DataLoaderState", "collate", "epoch_order", "pack",
]
