"""Supervised fine-tuning data: load, clean, format, tokenize, mask, pack, split.

Accepted files (``.jsonl``, ``.json`` holding a list of objects, ``.csv`` with a
header row). Each record is either

* an instruction pair: a prompt field (first present of ``instruction``,
  ``prompt``, ``question``, ``input``) and a response field (first present of
  ``response``, ``output``, ``completion``, ``answer``); an optional ``system``
  field becomes a system message. When both ``instruction`` and ``input`` are
  present, the input is appended to the instruction after a blank line (the
  Alpaca layout); or
* a chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  opening with a user (or system) message and ending with an assistant
  message. Every assistant turn is trained on.

Bad records (invalid JSON, missing fields, wrong types) never stop a load by
default: they are collected as :class:`DataIssue` (file, line, reason) in
:attr:`LoadResult.issues`; ``strict=True`` raises :class:`DataError` listing
them all. Cleaning strips whitespace, drops records with an empty prompt or
response and removes exact duplicates; records longer than ``max_length``
tokens are reported, then dropped (``overlong="drop"``), truncated
(``"truncate"``) or raise (``"error"``), never cut silently.

Tokenized examples carry ``input_ids`` and ``labels`` (``-100`` on every token
the model does not learn to produce: system and user turns, the chat
template's scaffolding before each assistant reply, padding).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

IGNORE_INDEX = -100

PROMPT_FIELDS = ("instruction", "prompt", "question", "input")
RESPONSE_FIELDS = ("response", "output", "completion", "answer")
ROLES = ("system", "user", "assistant")

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_FIELDS",
    "RESPONSE_FIELDS",
    "DataIssue",
    "DataError",
    "format_issues",
    "LoadResult",
    "Example",
    "load_records",
    "clean_records",
    "split_records",
    "format_chat",
    "tokenize_chat",
    "tokenize_each",
    "tokenize_records",
    "fit_length",
    "pack_examples",
    "Collator",
    "prepare_dataset",
]


@dataclass(frozen=True)
class DataIssue:
    """One problem found in a data file: where (file, 1-based line or record) and what."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def format_issues(issues: Sequence[DataIssue], limit: int = 10, indent: str = "    ") -> list[str]:
    """Report lines for skipped or changed records: the first ``limit`` as ``file:line: reason``, then a count."""
    lines = [f"{indent}{i}" for i in issues[:limit]]
    if len(issues) > limit:
        lines.append(f"{indent}... and {len(issues) - limit} more")
    return lines


class DataError(ValueError):
    """Raised for unreadable data (or for any bad record with ``strict=True``)."""

    def __init__(self, issues: Sequence[DataIssue] | str):
        if isinstance(issues, str):
            self.issues: list[DataIssue] = []
            super().__init__(issues)
            return
        self.issues = list(issues)
        shown = "\n  ".join(str(i) for i in self.issues[:20])
        more = f"\n  ... and {len(self.issues) - 20} more" if len(self.issues) > 20 else ""
        super().__init__(f"{len(self.issues)} bad record(s):\n  {shown}{more}")


@dataclass
class LoadResult:
    """Records as chats (``list`` of ``{"role", "content"}`` lists) with where each came from."""

    chats: list[list[dict]] = field(default_factory=list)
    sources: list[tuple[str, int]] = field(default_factory=list)  # (file, line) per chat
    issues: list[DataIssue] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chats)

    def summary(self) -> str:
        return f"{len(self.chats)} records, {len(self.issues)} issue(s)"


@dataclass
class Example:
    """One tokenized training example. ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``.

    ``position_ids`` is None for one example (positions ``0 .. len - 1``); a
    packed sequence (:func:`pack_examples`) restarts it at 0 at each example it holds.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


# ------------------------------------------------------------------------------ loading


def _record_to_chat(rec) -> list[dict]:
    """Normalise one record to a chat; raise ``ValueError(reason)`` when it is malformed."""
    chat = _parse_record(rec)
    for m in chat:
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can spell a lone surrogate ("\ud800"); no text encoding can
            raise ValueError(f"a {m['role']} message holds a lone surrogate (U+{ord(e.object[e.start]):04X} at "
                             f"character {e.start + 1}), which is not valid Unicode text") from None
    return chat


def _parse_record(rec) -> list[dict]:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        chat = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{j}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{j}].role is {m['role']!r}; expected one of {ROLES}")
            if not isinstance(m["content"], str):
                raise ValueError(f"messages[{j}].content must be a string, got {type(m['content']).__name__}")
            chat.append({"role": m["role"], "content": m["content"]})
        if chat[-1]["role"] != "assistant":
            raise ValueError("the last message must have role 'assistant' (nothing to learn otherwise)")
        if chat[0]["role"] == "assistant":
            raise ValueError("messages[0] has role 'assistant'; a chat opens with a user (or system) message, "
                             "the prompt the first reply answers")
        return chat

    prompt_key = next((k for k in PROMPT_FIELDS if k in rec), None)
    response_key = next((k for k in RESPONSE_FIELDS if k in rec), None)
    if prompt_key is None or response_key is None:
        raise ValueError(
            f"no {'prompt' if prompt_key is None else 'response'} field; expected 'messages' or one of "
            f"{PROMPT_FIELDS} and one of {RESPONSE_FIELDS}, got keys {sorted(rec)}"
        )
    prompt, response = rec[prompt_key], rec[response_key]
    for key, value in ((prompt_key, prompt), (response_key, response)):
        if not isinstance(value, str):
            raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if prompt_key == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
        prompt = f"{prompt.strip()}\n\n{rec['input'].strip()}"
    chat = []
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError(f"field 'system' must be a string, got {type(system).__name__}")
        chat.append({"role": "system", "content": system})
    chat += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return chat


def _not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    """Why ``raw`` (a line, or a whole file) failed to decode, with the 1-based column in its line."""
    start = raw.rfind(b"\n", 0, e.start) + 1
    column = len(raw[start:e.start].decode("utf-8", "replace")) + 1
    return f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the file as UTF-8"


def _iter_file(path: str) -> Iterable[tuple[int, object | Exception]]:
    """Yield (line or record number, parsed record or the parse error) for one file."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        # Bytes, decoded line by line: a line in another encoding is one bad record, not a failed load.
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, ValueError(_not_utf8(raw, e))
                    continue
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, ValueError(f"invalid JSON: {e.msg} at column {e.colno}")
    elif ext == ".json":
        with open(path, "rb") as f:
            raw = f.read().removeprefix(codecs.BOM_UTF8)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # one document: nothing to skip to
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError([DataIssue(path, line, _not_utf8(raw, e))]) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError([DataIssue(path, e.lineno, f"invalid JSON: {e.msg}")]) from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
        # no line numbers survive json.load: report the 1-based record index
        yield from enumerate(data, 1)
    elif ext == ".csv":
        # Quoted fields may span lines, so the file is decoded whole; bytes that are not
        # UTF-8 become lone surrogates (surrogateescape) and mark their record as bad.
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(io.StringIO(f.read(), newline=""))
            for rec in reader:
                # line of the record's last physical line (quoted fields may span lines)
                rec = {k: v for k, v in rec.items() if k is not None and v is not None}
                try:
                    "".join((*rec, *rec.values())).encode("utf-8")
                except UnicodeEncodeError as e:
                    byte = ord(e.object[e.start]) - 0xDC00
                    yield reader.line_num, ValueError(f"not valid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8")
                    continue
                yield reader.line_num, rec
    else:
        raise DataError(f"{path}: unsupported extension {ext!r}; expected .jsonl, .json or .csv")


def load_records(paths: str | os.PathLike | Sequence[str | os.PathLike], strict: bool = False) -> LoadResult:
    """Read one or more data files into chats (see the module docstring for the accepted fields).

    Malformed records are collected in ``result.issues`` (``strict=True``: raise
    :class:`DataError` listing every one). A missing file always raises.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    result = LoadResult()
    for path in map(os.fspath, paths):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file not found: {path}")
        for lineno, rec in _iter_file(path):
            if isinstance(rec, Exception):
                result.issues.append(DataIssue(path, lineno, str(rec)))
                continue
            try:
                chat = _record_to_chat(rec)
            except ValueError as e:
                result.issues.append(DataIssue(path, lineno, str(e)))
                continue
            result.chats.append(chat)
            result.sources.append((path, lineno))
    if strict and result.issues:
        raise DataError(result.issues)
    return result


def clean_records(data: LoadResult) -> LoadResult:
    """Strip whitespace, drop records with an empty message, drop exact duplicates.

    Dropped records are added to ``issues`` (a duplicate names the line it repeats).
    """
    out = LoadResult(issues=list(data.issues))
    seen: dict[str, tuple[str, int]] = {}
    for chat, (path, lineno) in zip(data.chats, data.sources):
        chat = [{"role": m["role"], "content": m["content"].strip()} for m in chat]
        empty = next((m["role"] for m in chat if not m["content"] and m["role"] != "system"), None)
        if empty is not None:
            out.issues.append(DataIssue(path, lineno, f"empty {empty} message; dropped"))
            continue
        chat = [m for m in chat if m["content"]]  # an empty system prompt is the same as none
        key = _canonical(chat)
        if key in seen:
            first = seen[key]
            out.issues.append(DataIssue(path, lineno, f"duplicate of {first[0]}:{first[1]}; dropped"))
            continue
        seen[key] = (path, lineno)
        out.chats.append(chat)
        out.sources.append((path, lineno))
    return out


def _canonical(chat: list[dict]) -> str:
    return json.dumps(chat, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def split_records(
    data: LoadResult, val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0
) -> tuple[LoadResult, LoadResult, LoadResult]:
    """Split into (train, validation, test), deterministic for given records and seed.

    Each record is ranked by a SHA-256 hash of ``seed`` and its content, so the
    split does not depend on the order of rows in the file (adding a row moves at
    most a few others). The test and validation sizes are ``fraction * n``
    rounded half up (0.5 -> 1: 0.1 of 5 records is 1, 0.1 of 4 is 0); train
    keeps the rest, in file order. Raises :class:`DataError` when the fractions
    leave no training record.
    """
    train_ids, val_ids, test_ids = _split_ids(data, val_fraction, test_fraction, seed)

    def take(ids) -> LoadResult:
        return LoadResult([data.chats[i] for i in ids], [data.sources[i] for i in ids], [])

    return take(train_ids), take(val_ids), take(test_ids)


def _round_half_up(x: float) -> int:
    # The 1e-9 absorbs binary fractions such as 0.7 * 5 = 3.4999999999999996.
    return math.floor(x + 0.5 + 1e-9)


def _split_ids(data: LoadResult, val_fraction: float, test_fraction: float,
               seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices into ``data`` of the train, validation and test records (see :func:`split_records`)."""
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction}")
    n = len(data)
    n_test, n_val = _round_half_up(test_fraction * n), _round_half_up(val_fraction * n)
    if n and n_test + n_val >= n:
        raise DataError(f"val_fraction {val_fraction} and test_fraction {test_fraction} of {n} record(s) leave no "
                        f"training record ({n_val} validation, {n_test} test, sizes rounded half up); "
                        "lower the fractions or add records")
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}\n{_canonical(data.chats[i])}".encode()).digest())
    test_ids, val_ids = set(rank[:n_test]), set(rank[n_test:n_test + n_val])
    train_ids = [i for i in range(n) if i not in test_ids and i not in val_ids]
    return train_ids, sorted(val_ids), sorted(test_ids)


# --------------------------------------------------------------------------- formatting

# Used when a tokenizer has no chat template: plain role headers, EOS after each
# assistant turn so generation knows where to stop.
_FALLBACK_HEADER = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def _render_fallback(chat: list[dict], add_generation_prompt: bool, eos: str) -> str:
    parts = []
    for m in chat:
        end = eos if m["role"] == "assistant" else ""
        parts.append(f"{_FALLBACK_HEADER[m['role']]}{m['content']}{end}\n\n")
    if add_generation_prompt:
        parts.append(_FALLBACK_HEADER["assistant"])
    return "".join(parts)


def format_chat(tokenizer, chat: list[dict], add_generation_prompt: bool = False) -> str:
    """Render ``chat`` as text with the tokenizer's chat template (or the fallback template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _render_fallback(chat, add_generation_prompt, tokenizer.eos_token or "")


def _encode(tokenizer, text: str) -> list[int]:
    # The rendered template already holds every special token it wants.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template_errors() -> tuple[type[Exception], ...]:
    """What rendering a chat raises for a record its template refuses.

    transformers raises ValueError (an empty conversation, a template it cannot
    use); a template's own checks (``raise_exception('System role not supported')``
    in Gemma's, the user/assistant alternation in Mistral's) raise jinja2's
    TemplateError, imported only when a render failed: the fallback template
    needs no jinja2.
    """
    try:
        from jinja2 import TemplateError
    except ImportError:
        return (ValueError,)
    return (ValueError, TemplateError)


def _render(tokenizer, chat: list[dict], add_generation_prompt: bool = False) -> str:
    """:func:`format_chat`, raising ValueError for a chat the template refuses."""
    try:
        return format_chat(tokenizer, chat, add_generation_prompt)
    except _template_errors() as e:
        raise ValueError(f"the chat template refused this record: {e}") from e


# A reply no real data holds, rendered in place of one to see where a template puts its content.
_REPLY_MARK = "@@lorakern-reply-7f3a9c@@"


def tokenize_chat(tokenizer, chat: list[dict]) -> Example:
    """Tokenize a chat, labelling exactly the assistant replies (and what ends them).

    The text is rendered at the boundaries of every assistant turn (prompt with
    the generation header, then prompt + reply) and each piece is tokenized on its
    own, so the prompt tokens are exactly what :func:`generate` feeds the model.
    Where the generation header is not how the template renders a reply's start
    (DeepSeek-R1 distills append ``<think>\\n`` to it), the reply starts where the
    template puts a placeholder reply's content in the same chat. When the
    template is not prefix-stable across turns (some templates rewrite earlier
    turns), only the last assistant turn is trained on.

    Raises ValueError for a record the template refuses, or whose reply cannot
    be told apart from its prompt; no text but a reply is ever labelled.
    """
    cuts: list[tuple[str, bool]] = []  # (text up to here, is the piece ending here a reply?)
    for i, m in enumerate(chat):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, chat[:i], add_generation_prompt=True)
        full = _render(tokenizer, chat[: i + 1])
        if not full.startswith(prompt):
            # Everything before this turn must render the same in both. The reply starts where the
            # template puts a reply's content: a placeholder reply, rendered in its place, marks it
            # (the renderings' common prefix would also swallow a reply's first characters where
            # they match the generation header's extra text, "<t" of "<tool>" after "<think>").
            before = _render(tokenizer, chat[:i])
            if not full.startswith(before):
                raise ValueError(f"the chat template renders the messages before assistant turn {i + 1} "
                                 "differently once the reply follows; cannot tell the reply from the prompt")
            marked = _render(tokenizer, [*chat[:i], {**m, "content": _REPLY_MARK}])
            start = marked.find(_REPLY_MARK)
            if start < len(before) or marked[:start] != full[:start]:
                raise ValueError(f"the chat template does not render assistant turn {i + 1}'s content after a "
                                 "header of its own; cannot tell the reply from the prompt")
            prompt = full[:start]
        cuts += [(prompt, False), (full, True)]
    if not all(b.startswith(a) for (a, _), (b, _) in zip(cuts, cuts[1:])):
        cuts = cuts[-2:]  # the last prompt is a prefix of the last full rendering (checked above)
    input_ids: list[int] = []
    labels: list[int] = []
    prev = ""
    for text, is_reply in cuts:
        ids = _encode(tokenizer, text[len(prev):])
        input_ids += ids
        labels += ids if is_reply else [IGNORE_INDEX] * len(ids)
        prev = text
    return Example(input_ids, labels)


def tokenize_each(tokenizer, data: LoadResult) -> tuple[LoadResult, list[Example]]:
    """Tokenize every chat of ``data`` whole (no length limit).

    Returns the chats the template renders (a :class:`LoadResult` with their
    sources, and ``data.issues`` followed by one issue per refused chat) and
    their examples in the same order. Only the returned chats can be fed to
    :func:`~lorakern.train.evaluate.generate`.
    """
    kept, examples = LoadResult(issues=list(data.issues)), []
    for chat, source in zip(data.chats, data.sources):
        try:
            examples.append(tokenize_chat(tokenizer, chat))
        except ValueError as e:
            kept.issues.append(DataIssue(*source, str(e)))
            continue
        kept.chats.append(chat)
        kept.sources.append(source)
    return kept, examples


def _fit_length(examples: Sequence[Example], sources: Sequence[tuple[str, int]], max_length: int,
                overlong: str) -> tuple[list[Example], list[DataIssue]]:
    """Apply ``overlong`` to examples longer than ``max_length``; drop those with nothing to learn."""
    if len(sources) != len(examples):
        raise ValueError(f"sources has {len(sources)} entries for {len(examples)} examples; expected one each")
    kept, issues = [], []
    for ex, (path, lineno) in zip(examples, sources):
        if len(ex) > max_length:
            issue = DataIssue(path, lineno, f"{len(ex)} tokens > max_length {max_length}; {overlong}")
            issues.append(issue)
            if overlong != "truncate":
                continue
            positions = None if ex.position_ids is None else list(ex.position_ids)[:max_length]
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], positions)
        if ex.num_labels == 0:
            issues.append(DataIssue(path, lineno, "no trainable tokens after formatting; dropped"))
            continue
        kept.append(ex)
    if overlong == "error" and issues:
        raise DataError(issues)
    return kept, issues


def fit_length(examples: Sequence[Example], sources: Sequence[tuple[str, int]], max_length: int,
               overlong: str = "drop") -> tuple[list[Example], list[DataIssue]]:
    """Apply ``overlong`` (see :func:`tokenize_records`) to tokenized ``examples`` longer than ``max_length``.

    ``sources``: each example's ``(path, line)``, for the issues reported. Returns
    the examples kept and the issues (over-long ones, and those left with no
    labelled token).
    """
    _check_length_options(max_length, overlong)
    return _fit_length(examples, sources, max_length, overlong)


def _check_length_options(max_length: int, overlong: str) -> None:
    if overlong not in ("drop", "truncate", "error"):
        raise ValueError(f"overlong must be 'drop', 'truncate' or 'error', got {overlong!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")


def tokenize_records(
    tokenizer, data: LoadResult, max_length: int, overlong: str = "drop"
) -> tuple[list[Example], list[DataIssue]]:
    """Tokenize every chat; report (and by default drop) those longer than ``max_length`` tokens.

    ``overlong``: ``"drop"`` (report and skip), ``"truncate"`` (report and cut the
    end; the example is kept only if a labelled token survives) or ``"error"``
    (raise :class:`DataError` listing them). A record the chat template refuses
    is reported and skipped.
    """
    _check_length_options(max_length, overlong)
    kept, examples = tokenize_each(tokenizer, data)
    examples, issues = _fit_length(examples, kept.sources, max_length, overlong)
    return examples, kept.issues[len(data.issues):] + issues


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Pack whole examples into sequences of at most ``max_length`` tokens (first-fit decreasing).

    No example is split, and each keeps its positions (``position_ids``
    restart at 0 where it starts), from which the :class:`Collator` and a
    model that builds its attention mask from positions make attention
    block-diagonal, so that none sees another (see there).
    In exchange batches carry no padding, which for short instruction data is
    most of the compute.
    """
    bins: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        if len(ex) > max_length:
            raise ValueError(f"example of {len(ex)} tokens does not fit max_length {max_length}")
        for b, free in enumerate(room):
            if len(ex) <= free:
                bins[b].append(ex)
                room[b] -= len(ex)
                break
        else:
            bins.append([ex])
            room.append(max_length - len(ex))
    return [_concatenated(b) for b in bins]


def _concatenated(examples: Sequence[Example]) -> Example:
    ids = [t for e in examples for t in e.input_ids]
    positions = [t for e in examples for t in _positions(e)]
    # An example's first token is never a target alone (nothing precedes it); packed, it would be
    # predicted from the example before it: the loss would gain a target across examples.
    labels = [IGNORE_INDEX if i and pos == 0 else t
              for i, (t, pos) in enumerate(zip((t for e in examples for t in e.labels), positions))]
    return Example(ids, labels, positions)


def _positions(ex: Example) -> list[int] | range:
    return range(len(ex)) if ex.position_ids is None else ex.position_ids


class Collator:
    """Pad a list of :class:`Example` to a batch (right padding to the longest, or to a multiple).

    Returns ``input_ids`` int64 [B, T], ``attention_mask`` int64 [B, T] (1 on
    tokens), ``labels`` int64 [B, T] (``IGNORE_INDEX`` on padding and prompts)
    and, when an example of the batch is packed, ``position_ids`` int64 [B, T]:
    0 at the start of every packed example and of the padding. Given those
    position ids, no attention mask and no cache (``use_cache=False``), a
    transformers model that builds its mask from positions (Llama, Qwen,
    Mistral, Gemma, GPT-2, ...) masks attention block-diagonally (each packed
    example sees only itself, padding only itself), the same mask for "sdpa",
    "eager" and :mod:`lorakern.train.attention`; flash attention takes the
    same boundaries from them. An example's loss then equals its loss alone.
    Models that drop the positions or carry a state along the row (OPT, Bloom,
    MPT, XGLM, Mamba) let packed examples see each other:
    :func:`~lorakern.train.loss.check_packing` detects it, and the
    :class:`~lorakern.train.Trainer` runs it and warns.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))

    def __call__(self, examples: Sequence[Example]) -> dict:
        import torch

        m = self.pad_to_multiple_of
        length = -(-max(len(e) for e in examples) // m) * m
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if any(e.position_ids is not None for e in examples):
            # Padding restarts at 0 too: a segment of its own, which no token of an example attends to.
            batch["position_ids"] = torch.tensor(
                [[*_positions(e), *range(length - len(e))] for e in examples], dtype=torch.long)
        return batch


@dataclass
class PreparedData:
    """Output of :func:`prepare_dataset`: tokenized splits, the raw chats of each split, issues."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    raw: dict[str, LoadResult]
    issues: list[DataIssue]

    def report(self) -> str:
        lines = [f"data: train {len(self.train)}, validation {len(self.validation)}, test {len(self.test)} examples"]
        if self.issues:
            lines.append(f"  {len(self.issues)} record(s) skipped or changed:")
            lines += format_issues(self.issues)
        return "\n".join(lines)


def prepare_dataset(
    tokenizer,
    paths,
    max_length: int = 512,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    strict: bool = False,
    overlong: str = "drop",
    packing: bool = False,
) -> PreparedData:
    """Load, clean, tokenize and split data files in one call (the usual path).

    Records the chat template refuses are dropped before the split, like
    malformed ones (``strict=True``: both raise :class:`DataError`, listed
    together). Only the train split is packed (``packing=True``); evaluation
    splits stay one example per sequence so per-example metrics remain
    meaningful. Raises :class:`DataError` when no training example is left
    (listing why each record was dropped), instead of a trainer with nothing to
    train on.
    """
    _check_length_options(max_length, overlong)
    loaded = load_records(paths)
    clean = clean_records(loaded)
    data, tokenized = tokenize_each(tokenizer, clean)
    refused = data.issues[len(clean.issues):]
    if strict and (loaded.issues or refused):
        files = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
        raise DataError(sorted(loaded.issues + refused, key=lambda i: (files.index(i.file), i.line)))
    ids = _split_ids(data, val_fraction, test_fraction, seed)
    issues = list(data.issues)
    splits, raw = {}, {}
    for name, part in zip(("train", "validation", "test"), ids):
        raw[name] = LoadResult([data.chats[i] for i in part], [data.sources[i] for i in part], [])
        splits[name], bad = _fit_length([tokenized[i] for i in part], raw[name].sources, max_length, overlong)
        issues += bad
    if not splits["train"]:
        raise DataError(issues) if issues else DataError(
            f"no training records in {paths if isinstance(paths, (str, os.PathLike)) else ', '.join(map(str, paths))}")
    if packing:
        splits["train"] = pack_examples(splits["train"], max_length)
    return PreparedData(splits["train"], splits["validation"], splits["test"], raw, issues)
