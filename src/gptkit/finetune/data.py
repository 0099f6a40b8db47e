"""Labelled examples for the GPT-1 tasks, from JSONL, CSV or TSV.

Fields (JSONL keys, or CSV/TSV columns: a header row naming them, or this order without one):
  classify: text, label            entail: premise, hypothesis, label
  similar:  text_a, text_b, label   choice: context, options (JSON list, or option_0..option_N columns), label
Labels may be strings or numbers; for `choice` the label is the index of the right option.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from ..errors import GptkitError

FIELDS = {"classify": ("text", "label"), "entail": ("premise", "hypothesis", "label"),
          "similar": ("text_a", "text_b", "label"), "choice": ("context", "options", "label")}


class TaskDataError(GptkitError):
    """A labelled file that cannot be read as the task's examples."""


@dataclass(frozen=True)
class Example:
    fields: dict
    label: str


def _check(row: dict, task: str, where: str, skip_bad: bool) -> Example | None:
    need = FIELDS[task]
    try:
        if any(k not in row or row[k] in (None, "") for k in need):
            raise TaskDataError(f"{where}: needs fields {', '.join(need)}")
        if task == "choice":
            options = row["options"] if isinstance(row["options"], list) else json.loads(row["options"])
            if len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise TaskDataError(f"{where}: options must be a list of at least two strings")
            row = {**row, "options": options}
            if not 0 <= int(row["label"]) < len(options):
                raise TaskDataError(f"{where}: label {row['label']} is not an option index")
        return Example({k: row[k] for k in need if k != "label"}, str(row["label"]))
    except (TaskDataError, ValueError, json.JSONDecodeError) as e:
        if skip_bad:
            return None
        raise TaskDataError(str(e) if isinstance(e, TaskDataError) else f"{where}: {e}") from None


def read_text(path: Path) -> str:
    """A data file's text, or a TaskDataError naming the file."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskDataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. with iconv") from None
    except FileNotFoundError:
        raise TaskDataError(f"no such file: {path}") from None


def option_columns(row: dict, where: str) -> list[str]:
    """The option_N columns' values in the order of N (option_10 after option_9, not after option_1)."""
    numbered = {}
    for key in row:
        if key.startswith("option_"):
            if not key[len("option_"):].isdigit():
                raise TaskDataError(f"{where}: column {key!r} is not option_ and a number")
            numbered[int(key[len("option_"):])] = row[key]
    return [numbered[i] for i in sorted(numbered)]


def load_examples(path: str | Path, task: str, skip_bad: bool = False) -> list[Example]:
    path = Path(path)
    if task not in FIELDS:
        raise TaskDataError(f"unknown task {task!r}; choose {', '.join(FIELDS)}")
    if not path.exists():
        raise TaskDataError(f"no such file: {path}")
    examples = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if skip_bad:
                    continue
                raise TaskDataError(f"{path}:{n}: not valid JSON") from None
            examples.append(_check(row, task, f"{path}:{n}", skip_bad))
    else:
        delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
        rows = list(csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter,
                               quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL))
        need = FIELDS[task]
        header = rows[0] if rows and set(need) - {"options"} <= set(rows[0]) else None
        names = header or list(need)
        for n, values in enumerate(rows[1:] if header else rows, 2 if header else 1):
            if not values:
                continue
            row = dict(zip(names, values))
            if task == "choice" and "options" not in row:  # option_0, option_1, ... columns
                row["options"] = option_columns(row, f"{path}:{n}")
            examples.append(_check(row, task, f"{path}:{n}", skip_bad))
    examples = [e for e in examples if e is not None]
    if not examples:
        raise TaskDataError(f"{path} has no examples")
    return examples


def hold_out(examples: list, source: object, fraction: float = 0.1) -> tuple[list, list]:
    """(train, validation): the first `fraction` of the examples validate, when no validation file is given."""
    if len(examples) < 2:
        raise TaskDataError(f"{source} has {len(examples)} usable example(s): too few to hold out a validation "
                            f"tenth; give more, or a --val file")
    cut = max(1, int(len(examples) * fraction))
    return examples[cut:], examples[:cut]
