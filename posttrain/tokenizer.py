"""Gemma 3 tokenizer: sentencepiece, loaded from `tokenizer.model` or rebuilt from GGUF metadata.

    tok = load_tokenizer("gemma3-270m")             # or a directory with tokenizer.model, or a .gguf
    tok.encode("Hello world")                        # [9259, 1902]
    enc = tok.apply_chat_template(messages)          # ChatEncoding(ids, loss_mask) for SFT
    tok.save_pretrained("out/")                      # loadable by transformers.AutoTokenizer

Ids match transformers' Gemma tokenizer: control tokens written literally in text (`<bos>`,
`<start_of_turn>`, ...) are split out first, because sentencepiece alone never parses them.
The chat template inserts control ids directly, so message content can never forge a turn marker.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .embedded import EMBEDDED_NAME, embedded_gguf_path
from .errors import UserError

# The official Gemma 3 instruction-tuned chat template (tokenizer_config.json of google/gemma-3-*-it).
# `Tokenizer.render_chat` reproduces it; save_pretrained writes it so transformers agrees with us.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Every Gemma control piece looks like `<name>`; text is scanned for this shape and a match is a
# control token only if the vocabulary says so (cheaper than a 6,000-way alternation regex).
_CONTROL_SHAPE = re.compile(r"<[^<>]+>")

# Images in the chat (the Gemma 3 report, section 2.1; transformers' Gemma3Processor): an image part renders
# as <start_of_image>, which the processor expands to "\n\n<start_of_image>" + 256 x <image_soft_token> +
# "<end_of_image>\n\n". The 262,144-piece vocabulary has no soft token: its id is the first one past it.
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
BOI_TOKEN_ID, EOI_TOKEN_ID, IMAGE_TOKEN_ID = 255_999, 256_000, 262_144


def image_text(crops: int, tokens_per_image: int = 256) -> str:
    """What one image placeholder becomes; with Pan & Scan crops, the original image and then its crops.

    This is transformers' string expansion: tokenised with the turn, the user header's "\n" and the
    "\n\n" before <start_of_image> merge into one "\n\n\n" token (109). Google's own stacks insert
    tokens instead ("\n" 107, then "\n\n" 108); we follow transformers, which parity tests check."""
    one = f"\n\n{BOI}{SOFT * tokens_per_image}{EOI}\n\n"
    if not crops:
        return one
    return (f"Here is the original image {one} and here are some crops to help you see better "
            + " ".join([one] * crops))


class ChatEncoding(NamedTuple):
    """A tokenized conversation. `loss_mask[i]` is True where the SFT loss covers `ids[i]`."""

    ids: list[int]
    loss_mask: list[bool]


class Tokenizer:
    """A Gemma 3 sentencepiece tokenizer with the chat template and transformers-compatible ids."""

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.source = source
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.eos_id: int = self._sp.eos_id()
        self.bos_id: int = self._sp.bos_id()
        self.unk_id: int = self._sp.unk_id()
        # transformers treats control pieces and <unk> as special: matched whole in text, dropped by
        # decode(skip_special_tokens=True), and printed literally otherwise.
        sp = self._sp
        self._special = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self._special_ids = frozenset(self._special.values())
        bad = [p for p in self._special if not _CONTROL_SHAPE.fullmatch(p)]
        assert not bad, f"{source}: control pieces {bad[:5]} are not of the form <name>"
        for name in ("<start_of_turn>", "<end_of_turn>"):
            if name not in self._special:
                raise UserError(f"{source}: the vocabulary has no control piece {name}; a Gemma 3 tokenizer "
                                "is required (fix: point at a Gemma 3 tokenizer.model or GGUF)")
        self.start_of_turn_id: int = self._special["<start_of_turn>"]
        self.end_of_turn_id: int = self._special["<end_of_turn>"]
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.end_of_turn_id)
        self._newline = self._sp.encode("\n")
        self._containing: dict[tuple[str, ...], tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    # ----- plain text -----

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or `unk_id` if the vocabulary has no such piece."""
        return self._sp.piece_to_id(piece)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Control tokens written in the text (`<end_of_turn>`) become their ids."""
        ids = [self.bos_id] if add_bos else []
        start = 0
        for m in _CONTROL_SHAPE.finditer(text):
            if m.group() in self._special:
                ids += self._sp.encode(text[start:m.start()]) + [self._special[m.group()]]
                start = m.end()
        return ids + self._sp.encode(text[start:])

    def ids_containing(self, texts: Iterable[str]) -> tuple[int, ...]:
        """Ids of the (non-control) tokens whose text contains any of `texts`, e.g. every newline run
        for "\n": what a generation stop string matches within one token."""
        texts = tuple(texts)
        if not texts:
            return ()
        if texts not in self._containing:
            sp = self._sp
            self._containing[texts] = tuple(i for i in range(self.vocab_size) if i not in self._special_ids
                                            and any(t in sp.decode([i]) for t in texts))
        return self._containing[texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list or a 1-D tensor). Control tokens print as `<name>` unless skipped."""
        parts: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            if i not in self._special_ids:
                run.append(i)
                continue
            # sentencepiece decodes control pieces to "" and <unk> to " ⁇ ", so they are spelled here.
            parts.append(self._sp.decode(run))
            run = []
            if not skip_special_tokens:
                parts.append(self._sp.id_to_piece(i))
        parts.append(self._sp.decode(run))
        return "".join(parts)

    # ----- chat -----

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as template text, exactly what the official jinja template renders."""
        text = "<bos>" + "".join(f"<start_of_turn>{r}\n{t}<end_of_turn>\n" for r, t in _turns(messages))
        return text + ("<start_of_turn>model\n" if add_generation_prompt else "")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, *,
                            image_crops: Sequence[int] | None = None,
                            tokens_per_image: int = 256) -> ChatEncoding:
        """Token ids of the Gemma 3 chat format, and the SFT loss mask.

        The mask covers each model reply and its `<end_of_turn>` (the token that teaches the model to
        stop), not the `model\\n` header and not the "\\n" after `<end_of_turn>`: generation stops at
        `<end_of_turn>`, so that newline is template glue the model never has to produce.
        Content is encoded as plain text: a literal "<end_of_turn>" in a message stays text.

        image_crops: the Pan & Scan crop count of each image part, in order (0: none); each part then
        becomes its block of `tokens_per_image` image tokens (image_text). None: image parts stay the
        single <start_of_image> token the template renders. Images belong in user turns.
        """
        ids, mask = [self.bos_id], [False]
        placeholders = 0
        for role, text in _turns(messages):
            # Header and content are one segment, as transformers tokenizes the rendered text. A reply is
            # stripped and "\n" is a user-defined piece that never merges, so "model\n" is its own prefix.
            if image_crops is not None and SOFT in text:
                raise UserError(f"a {role} turn contains the literal text {SOFT}, which only image parts may produce "
                                "(fix: remove it from the message, or give the image as a {\"type\": \"image\"} part)")
            if image_crops is not None and BOI in text:
                if role == "model":
                    raise UserError("an image part is in an assistant turn; images belong in user turns "
                                    "(fix: move the image into the user message before it)")
                parts = text.split(BOI)
                if placeholders + len(parts) - 1 > len(image_crops):
                    raise UserError(f"the messages hold more image parts than the {len(image_crops)} images given "
                                    "(fix: give one image per {\"type\": \"image\"} part)")
                text = parts[0] + "".join(image_text(image_crops[placeholders + k], tokens_per_image) + rest
                                          for k, rest in enumerate(parts[1:]))
                placeholders += len(parts) - 1
            # Only an image block's own soft tokens become IMAGE_TOKEN_ID; without images the text stays text.
            encode = self._sp.encode if image_crops is None else self._encode_images
            body = encode(f"{role}\n{text}")
            head = self._sp.encode(f"{role}\n") if role == "model" else body
            assert body[: len(head)] == head, f"header {head} is not a prefix of {body[:len(head)]}"
            ids += [self.start_of_turn_id, *body, self.end_of_turn_id, *self._newline]
            train = role == "model"  # the reply's tokens and its <end_of_turn>
            mask += [False] * (1 + len(head)) + [train] * (len(body) - len(head) + 1) + [False] * len(self._newline)
        if image_crops is not None and placeholders != len(image_crops):
            raise UserError(f"{len(image_crops)} images were given but the messages hold {placeholders} image parts "
                            "(fix: one {\"type\": \"image\"} part per image, in order)")
        if add_generation_prompt:
            gen = [self.start_of_turn_id, *self._sp.encode("model\n")]
            ids += gen
            mask += [False] * len(gen)
        return ChatEncoding(ids, mask)

    def _encode_images(self, text: str) -> list[int]:
        """sentencepiece ids of `text`, with every <image_soft_token> as IMAGE_TOKEN_ID (transformers splits
        the text at that added token the same way)."""
        if SOFT not in text:
            return self._sp.encode(text)
        out: list[int] = []
        for k, part in enumerate(text.split(SOFT)):
            out += ([IMAGE_TOKEN_ID] if k else []) + (self._sp.encode(part) if part else [])
        return out

    # ----- files -----

    def save_pretrained(self, out_dir: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write tokenizer.model, tokenizer_config.json, special_tokens_map.json and chat_template.jinja.

        transformers.AutoTokenizer.from_pretrained(out_dir) then gives our ids and our chat template.
        `model_max_length` None writes transformers' "no limit" sentinel, as the official Gemma 3 files do.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.model").write_bytes(self._proto)
        named = {k: self.id_to_piece(getattr(self, f"{k}_id")) for k in ("bos", "eos", "pad", "unk")}
        special = {f"{k}_token": v for k, v in named.items()}
        config = {
            "tokenizer_class": "GemmaTokenizer",
            **special,
            "add_bos_token": True,  # plain-text encoding starts with <bos>; the chat template writes its own
            "add_eos_token": False,
            "model_max_length": model_max_length or int(1e30),
            "padding_side": "left",
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            # Older transformers read the template here; 4.43+ prefer chat_template.jinja, same text.
            "chat_template": GEMMA3_CHAT_TEMPLATE,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        (out / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
        return out


def _content_text(content: Any, index: int, strip: bool) -> str:
    """A message's text: a string, or HF's parts `[{"type": "text", "text": ...}, {"type": "image"}]`."""
    if isinstance(content, str):
        return content.strip() if strip else content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                texts.append(BOI)  # as the official template renders it; apply_chat_template expands it
                continue
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise UserError(f"messages[{index}].content: part {part!r} is neither a text nor an image part; "
                                'parts are {"type": "text", "text": ...} or {"type": "image"} (fix: drop other parts)')
            texts.append(part["text"].strip() if strip else part["text"])
        return "".join(texts)
    raise UserError(f"messages[{index}].content must be a string or a list of text parts, "
                    f"got {type(content).__name__} (fix: pass the text as a string)")


def _turns(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """Validate a conversation; return `[(role, text)]`, role in user/model, system merged into turn 0.

    As in the official template, turn content is stripped but the system text is used as is. A system
    message given as parts joins all its text parts (the official template keeps only the first).
    """
    if not messages:
        raise UserError("messages is empty; a conversation needs at least one user message")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and "role" in m and "content" in m):
            raise UserError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
    prefix, start = "", 0
    if messages[0]["role"] == "system":
        prefix, start = _content_text(messages[0]["content"], 0, strip=False) + "\n\n", 1
        if len(messages) == 1:
            raise UserError("messages[0] is a system message with no user message after it; "
                            "Gemma 3 merges the system text into the first user turn (fix: add a user message)")
    turns = []
    for i in range(start, len(messages)):
        role = messages[i]["role"]
        if role == "system":
            raise UserError(f"messages[{i}]: a system message is only allowed as the first message, because Gemma 3 "
                            "merges it into the first user turn (fix: move it first or merge it into a user message)")
        if role not in ("user", "assistant", "model"):
            raise UserError(f"messages[{i}]: unknown role {role!r}; expected system, user or assistant (alias model)")
        role = "user" if role == "user" else "model"
        expected = "user" if (i - start) % 2 == 0 else "model"
        if role != expected:
            raise UserError(f"messages[{i}]: role {messages[i]['role']!r} where {expected!r} was expected; Gemma 3 "
                            "turns must alternate user/assistant starting with user (fix: merge or drop the extra turn)")
        text = _content_text(messages[i]["content"], i, strip=True)
        turns.append((role, (prefix if i == start else "") + text))
    return turns


# ----- loading -----


def load_tokenizer(source: str | os.PathLike) -> Tokenizer:
    """Load from a directory with `tokenizer.model`, a `.gguf` file, or the name "gemma3-270m"."""
    if str(source) == EMBEDDED_NAME:
        source = embedded_gguf_path()
    path = Path(source)
    fix = f"pass a directory containing tokenizer.model, a .gguf file, or {EMBEDDED_NAME!r}"
    if not path.exists():
        raise UserError(f"tokenizer source {str(path)!r} does not exist (fix: {fix})")
    if path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise UserError(f"directory {str(path)!r} has no tokenizer.model (fix: {fix})")
        path = path / "tokenizer.model"
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf or path.suffix == ".gguf":
        return Tokenizer(_proto_from_gguf(path), str(path))
    proto = path.read_bytes()
    try:
        spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:
        raise UserError(f"{path} is not a valid sentencepiece model ({e}) (fix: {fix})") from None
    return Tokenizer(proto, str(path))


# In-process cache: rebuilding the 262k-piece proto from GGUF metadata takes about a second.
_GGUF_CACHE: dict[tuple[str, int, int], bytes] = {}


def _proto_from_gguf(path: Path) -> bytes:
    """Serialized sentencepiece ModelProto rebuilt from the GGUF's tokenizer.ggml.* metadata."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _GGUF_CACHE:
        _GGUF_CACHE[key] = _build_proto(_read_gguf_tokenizer(path), path)
    return _GGUF_CACHE[key]


def _build_proto(meta: dict[str, Any], path: Path) -> bytes:
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    if not len(tokens) == len(scores) == len(types):
        raise UserError(f"{path}: tokenizer.ggml tokens/scores/token_type lengths differ "
                        f"({len(tokens)}/{len(scores)}/{len(types)}); the file is corrupt (fix: re-download it)")
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id", d) for k, d in
           (("padding", 0), ("eos", 1), ("bos", 2), ("unknown", 3))}
    m = sp_pb2.ModelProto()
    ts = m.trainer_spec
    # BPE with byte fallback: scores rank merges, and characters outside the vocabulary become <0xNN>.
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = True
    order = ("padding", "eos", "bos", "unknown")
    ts.pad_id, ts.eos_id, ts.bos_id, ts.unk_id = (ids[k] for k in order)
    ts.pad_piece, ts.eos_piece, ts.bos_piece, ts.unk_piece = (tokens[ids[k]] for k in order)
    # Identity normalizer: no dummy "▁" prefix and no whitespace collapsing, or leading and repeated
    # spaces would tokenize differently; spaces are still escaped to U+2581 ("▁").
    ns = m.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", False, False, True
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        # GGUF token types use sentencepiece's numbering (1 normal ... 6 byte); 0 means undefined.
        kind = 2 if i == ids["unknown"] else (kind or 1)
        if kind == 4:
            # llama.cpp stores the user-defined space runs with literal spaces; sentencepiece matches
            # user-defined pieces against escaped text, so "  " must be "▁▁" again.
            piece = piece.replace(" ", "\u2581")
        m.pieces.add(piece=piece, score=score, type=kind)
    return m.SerializeToString()


# GGUF scalar value types -> struct format (4/5/6 are u32/i32/f32, 7 bool, 10-12 u64/i64/f64).
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read_gguf_tokenizer(path: Path) -> dict[str, Any]:
    """The GGUF's metadata key/values (not its tensors), checking the tokenizer keys are there."""
    size = path.stat().st_size
    corrupt = f"(fix: re-download or re-export the GGUF; {EMBEDDED_NAME!r} is a known-good one)"
    with open(path, "rb") as f:

        def take(n: int) -> bytes:
            # Bounds are checked against the file size so a corrupt length cannot trigger a huge read.
            if n > size - f.tell():
                raise UserError(f"{path}: the GGUF ends inside its metadata; it is truncated or corrupt {corrupt}")
            return f.read(n)

        def string() -> str:
            try:
                return take(struct.unpack("<Q", take(8))[0]).decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}: a GGUF metadata string is not UTF-8; the file is corrupt {corrupt}") from None

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALAR:
                fmt = "<" + _GGUF_SCALAR[kind]
                return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]
            if kind == 8:
                return string()
            if kind == 9:
                item, count = struct.unpack("<IQ", take(12))
                if item in _GGUF_SCALAR:
                    fmt = f"<{count}{_GGUF_SCALAR[item]}"
                    return list(struct.unpack(fmt, take(struct.calcsize(fmt))))
                return [value(item) for _ in range(count)]
            raise UserError(f"{path}: unknown GGUF metadata value type {kind}; the file is corrupt {corrupt}")

        if take(4) != b"GGUF":
            raise UserError(f"{path} does not start with the GGUF magic bytes, so it is not a GGUF file {corrupt}")
        version, _n_tensors, n_kv = struct.unpack("<IQQ", take(20))
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are) {corrupt}")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(struct.unpack("<I", take(4))[0])
    missing = [k for k in ("tokens", "scores", "token_type") if f"tokenizer.ggml.{k}" not in meta]
    if missing:
        raise UserError(f"{path} has no tokenizer metadata (tokenizer.ggml.{missing[0]} is missing) (fix: use a GGUF "
                        "exported with its tokenizer, or a directory containing tokenizer.model)")
    if meta.get("tokenizer.ggml.model", "llama") != "llama":
        raise UserError(f"{path}: tokenizer.ggml.model is {meta['tokenizer.ggml.model']!r}; only sentencepiece "
                        "vocabularies ('llama', as Gemma uses) are supported (fix: use a Gemma 3 GGUF)")
    return meta
