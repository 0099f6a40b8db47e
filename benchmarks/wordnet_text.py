"""WordNet 3.0's glosses as plain English text: extra unlabelled pre-training text for finetune_sst2.py.

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wordnet
    python benchmarks/wordnet_text.py wordnet/usr/share/wordnet /tmp/wordnet.txt

One line per synset: `word , synonym : gloss ; "example"` (117,659 lines, 1.96M words), lowercased like SST-2.
"""

import argparse
from pathlib import Path


def synset_lines(data_file: Path):
    for line in data_file.read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:  # the licence header, or a synset without a gloss
            continue
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        count = int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
        yield f"{' , '.join(words)} : {gloss.strip()}".lower()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wordnet_dir", type=Path, help="the folder holding data.noun, data.verb, data.adj, data.adv")
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    lines = [s for pos in ("adj", "adv", "noun", "verb") for s in synset_lines(args.wordnet_dir / f"data.{pos}")]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines):,} synsets, {sum(len(s.split()) for s in lines):,} words -> {args.out}")


if __name__ == "__main__":
    main()
