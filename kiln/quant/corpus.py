"""Text for calibration and for the accuracy gate's perplexity.

The built-in corpus is CPython's own documentation text in `pydoc_data.topics` (present on every
Python install, no download). It is split by topic into a calibration part and a held-out part
that share no topic (the gate measures perplexity on text the calibration never saw). A user's
corpus is a plain-text file (one text) or JSONL with a `text` field per line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HELD_OUT_FRACTION = 1 / 3  # of the built-in corpus's characters


def builtin_split() -> tuple[list[str], list[str]]:
    """(calibration texts, held-out texts) of the built-in corpus, each in a fixed order, disjoint.
    Several topic names share one text, so the split goes by content, each text once: in the order
    of their sha256, texts go to the held-out part until it has a third of the characters
    (168,396 characters: 40,478 tokens of SmolLM2's tokenizer; calibration 72,411 tokens)."""
    from pydoc_data.topics import topics

    texts = sorted(set(topics.values()), key=lambda t: hashlib.sha256(t.encode()).digest())
    target = HELD_OUT_FRACTION * sum(map(len, texts))
    calib, held, n = [], [], 0
    for text in texts:
        if n < target:
            held.append(text)
            n += len(text)
        else:
            calib.append(text)
    return calib, held


def read_texts(path: str | Path) -> list[str]:
    """A plain-text file is one text; a .jsonl file has one JSON object with a string `text` per line."""
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    texts = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{i}: each line must be an object with a string 'text' field")
        texts.append(obj["text"])
    return texts


def token_windows(token_lists: list[list[int]], seq_len: int, max_windows: int | None = None,
                  separator: int | None = None) -> list[list[int]]:
    """Concatenate tokenized texts (with `separator` between them, e.g. EOS) and cut full windows of
    seq_len tokens; the last partial window is dropped. At most max_windows."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    stream: list[int] = []
    for toks in token_lists:
        if stream and separator is not None:
            stream.append(separator)
        stream.extend(toks)
    n = len(stream) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]
