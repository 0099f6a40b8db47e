"""GCIDE (Webster's 1913 + WordNet) as plain English text: more unlabelled pre-training text for finetune_sst2.py.

    apt-get download dict-gcide && dpkg-deb -x dict-gcide_*.deb gcide
    python benchmarks/gcide_text.py gcide/usr/share/dictd/gcide.dict.dz /tmp/gcide.txt

One line per definition (`headword : definition`) and one per quotation (`quotation`), lowercased like SST-2;
etymologies, pronunciations, source tags and citations are dropped.
"""

import argparse
import gzip
import re
from pathlib import Path

BRACKETS = re.compile(r"\[[^\[\]]*\]")  # etymologies, [1913 Webster], accent codes like [=o]: innermost first
PRONUNCIATION = re.compile(r"\\[^\\]*\\|\([^()]*[*\"][^()]*\)")  # \A*ban"don\ and (-d[u^]nd)
CITATION = re.compile(r"\s--(?=\S).*$")  # "... it was very good. --Gen. i. 31."
SENSE_NUMBER = re.compile(r"^(\d+\.|\([a-z]\))\s*")


def clean(text: str) -> str:
    while (stripped := BRACKETS.sub("", text)) != text:
        text = stripped
    text = PRONUNCIATION.sub("", text).replace("{", "").replace("}", "")
    return " ".join(CITATION.sub("", text).split()).lower()


def entry_lines(entry: str):
    head, *body = entry.split("\n")
    word = head.split(" \\", 1)[0].strip()
    paragraphs, current = [], [head]
    for line in body:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    paragraphs.append(current)
    for lines in filter(None, paragraphs):
        quotation = len(lines[0]) - len(lines[0].lstrip()) >= 8
        text = clean(" ".join(lines))
        if not quotation:
            text = SENSE_NUMBER.sub("", text)
            text = text if text.startswith(word.lower()) else f"{word.lower()} : {text}"
        if len(text.split()) >= 4:
            yield text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dict_file", type=Path, help="gcide.dict.dz (or the same text uncompressed)")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    raw = args.dict_file.read_bytes()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8", errors="replace")
    # An entry starts at an unindented line; the dictd header entries (00-database-*) and file banners are skipped.
    entries = re.split(r"\n(?=\S)", text)
    lines = [s for e in entries if " \\" in e.split("\n", 1)[0] for s in entry_lines(e)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(entries):,} entries, {len(lines):,} lines, {sum(len(s.split()) for s in lines):,} words -> {args.out}")


if __name__ == "__main__":
    main()
