"""SST-2 sentiment (GPT-1's task) on CPU: TF-IDF logistic regression vs gptkit pre-train + fine-tune.

    python benchmarks/finetune_sst2.py ../shared/data/sst2/train.tsv ../shared/data/sst2/dev.tsv \
        [--corpus /tmp/wordnet.txt /tmp/gcide.txt] [--pretrain-seconds 1250]

(a) scikit-learn TF-IDF + logistic regression; (b) a small gptkit model pre-trained, GPT-1 style, for
--pretrain-seconds on unlabelled text (the SST-2 training sentences plus each --corpus file, one document per
line: benchmarks/wordnet_text.py and gcide_text.py make them; the last 2% of the tokens are the
LM's validation split, and dev sentences sharing 8 words in a row with the --corpus text are counted), then
fine-tuned with the auxiliary LM loss; (c) the same fine-tuning from random weights; (d) LoRA on (b).
Pre-training uses dtype auto (bf16 autocast where the CPU has native bf16, AVX512-BF16/AMX, else fp32), no
dropout (about one pass over the text; fine-tuning uses 0.1, no attention dropout), and the in-batch sampled
softmax (the full head is most of a small model's step), as does fine-tuning's auxiliary LM loss; (b) is
fine-tuned with --seeds seeds and their mean is reported ((b'), their averaged probabilities, is printed beside
it). Early stopping uses a tenth of the training set; accuracy is on dev.
"""

import argparse
import csv
import re
import tempfile
import time
from pathlib import Path

from gptkit.data import Document, prepare
from gptkit.finetune import Example, FinetuneConfig, finetune, load_task, predict
from gptkit.train import load_recipe, train


def read_tsv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row[0], row[1]) for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(row) == 2]


def tfidf(train, dev) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform([t for t, _ in train]), [y for _, y in train])
    return clf.score(vec.transform([t for t, _ in dev]), [y for _, y in dev])


def overlapping(dev: list[str], docs: list[Document], n: int = 8) -> int:
    """Dev sentences that share a word n-gram with the pre-training text (GPT-3's contamination check)."""
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9']+", text.lower())

    grams = {}
    for i, sentence in enumerate(dev):
        w = words(sentence)
        for j in range(len(w) - n + 1):
            grams.setdefault(tuple(w[j:j + n]), set()).add(i)
    hit = set()
    for doc in docs:
        w = words(doc.text)
        for j in range(len(w) - n + 1):
            hit.update(grams.get(tuple(w[j:j + n]), ()))  # no new set per n-gram of the corpus
    return len(hit)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train", type=Path)
    ap.add_argument("dev", type=Path)
    ap.add_argument("--corpus", type=Path, nargs="*", default=[], help="extra unlabelled text, one document per line")
    ap.add_argument("--sst-repeat", type=int, default=1, help="copies of the SST-2 sentences in the pre-training text")
    ap.add_argument("--pretrain-seconds", type=float, default=1250)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", choices=["last", "mean"], default="mean")
    ap.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds for (b)")
    args = ap.parse_args()
    for path in (args.train, args.dev, *args.corpus):
        if not path.is_file():
            ap.error(f"no such file: {path}")
    start = time.perf_counter()
    train_rows, dev_rows = read_tsv(args.train), read_tsv(args.dev)
    rows = [("(a) TF-IDF + logistic regression (scikit-learn)", tfidf(train_rows, dev_rows), None, None)]
    examples = [Example({"text": t}, y) for t, y in train_rows]
    val, fit = examples[: len(examples) // 10], examples[len(examples) // 10:]
    dev = [Example({"text": t}, y) for t, y in dev_rows]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        docs = [Document(f"sst2:{r}:{i}", t) for r in range(args.sst_repeat) for i, (t, _) in enumerate(train_rows)]
        for path in args.corpus:
            lines = path.read_text(encoding="utf-8").splitlines()
            docs += [Document(f"{path.name}:{i}", line) for i, line in enumerate(lines) if line.strip()]
        # The SST-2 training sentences are meant to be there; any other text must not hold dev sentences.
        contaminated = overlapping([t for t, _ in dev_rows], docs[len(train_rows) * args.sst_repeat:])
        # 2% held out: the LM val loss is a progress figure here, the text is worth more as training data
        t = time.perf_counter()
        prepare(docs, d / "data", tokenizer="bpe", vocab_size=args.vocab_size, val_fraction=0.02)
        prepare_s = time.perf_counter() - t
        cfg = load_recipe(None, [
            ("model={n_layer=4, n_head=4, n_embd=128, context=64, dropout=0.0, attn_dropout=0.0, pos='rope', "
             "norm='rmsnorm', activation='relu2', bias=false}"),
            "batch_size=32", "dtype='auto'", "optimizer='muon'", "lr=3e-3", "muon_lr=0.02", "schedule='wsd'",
            "sampled_softmax=true", "warmup_steps=50", "max_steps=0", "eval_interval=100000", "eval_tokens=200000",
            "ckpt_interval=100000", "log_interval=100"],
            preset="tiny-gpt2", data=str(d / "data"), out=str(d / "base"), time_limit=args.pretrain_seconds)
        pre = train(cfg, quiet=True)
        corpus = " + ".join(["SST-2 text", *(p.name for p in args.corpus)])
        runs = [(f"(b) gptkit: pre-trained on {corpus}, fine-tuned (+ LM loss 0.5), seed {s}", {"seed": s})
                for s in range(args.seeds)]
        runs += [("(c) gptkit: same fine-tuning from random weights", {"from_scratch": True}),
                 ("(d) gptkit: LoRA (rank 8) on (b)", {"lora_rank": 8, "lr": 4 * args.lr})]
        probs = []  # per run: each dev sentence's label probabilities
        for name, kw in runs:
            t = time.perf_counter()
            ft = FinetuneConfig(**{"epochs": args.epochs, "lr": args.lr, "batch_size": 32, "patience": 2,
                                   "pool": args.pool, "dropout": 0.1, "sampled_softmax": True, **kw})
            out = d / f"task{len(rows)}"
            r = finetune(d / "base", fit, val, out, ft, quiet=True)
            print(f"{name}: {r['epochs']}", flush=True)
            model, tok = load_task(out)
            probs.append([predict(model, tok, e.fields)[1] for e in dev])
            acc = sum(max(p, key=p.get) == e.label for p, e in zip(probs[-1], dev)) / len(dev)
            rows.append((name, acc, r["trainable_params"], time.perf_counter() - t))
        seeds = rows[1:1 + args.seeds]
        # The seeds' mean is (b)'s figure; the ensemble (their averaged probabilities) is a separate model.
        votes = [{y: sum(p[i][y] for p in probs[:args.seeds]) for y in probs[0][i]} for i in range(len(dev))]
        ensemble = sum(max(v, key=v.get) == e.label for v, e in zip(votes, dev)) / len(dev)
        mean = sum(r[1] for r in seeds) / len(seeds)
        rows[1 + args.seeds:1 + args.seeds] = [
            (f"(b) mean of {args.seeds} seeds", mean, None, None),
            (f"(b') ensemble of the {args.seeds} seeds (mean probabilities)", ensemble, None, None)]
    print(f"SST-2 dev ({len(dev_rows)} sentences, {contaminated} sharing an 8-word sequence with the --corpus "
          f"text); prepare {prepare_s:.0f} s; pre-training {pre['elapsed_s']:.0f} s, {pre['tokens']:,} tokens, "
          f"val loss {pre['val_loss']:.3f}; whole run {time.perf_counter() - start:.0f} s")
    print("| run | dev accuracy | trained parameters | fine-tune s |")
    print("|---|---:|---:|---:|")
    for name, acc, params, secs in rows:
        print(f"| {name} | {acc:.3f} | {'' if params is None else f'{params:,}'} | "
              f"{'' if secs is None else f'{secs:.0f}'} |")


if __name__ == "__main__":
    main()
