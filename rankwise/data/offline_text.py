"""Real English text that ships offline (Debian packages or PyPI), and a byte-level tokenizer.

Corpora (see ../shared/specs/offline-assets.md):
- `kjv`: the King James Bible, from the Debian `bible-kjv` package (`bible` command), 4.4 MB;
- `fortunes`: the fortune cookies of the Debian `fortunes` package, 2.8 MB;
- `lee`: the Lee news corpus shipped inside the `gensim` wheel, 0.36 MB;
- any path to a UTF-8 text file.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import torch

from rankwise.core.errors import ConfigError

CORPORA = ("kjv", "fortunes", "lee")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
_VERSE_REF = re.compile(r"^\S+?\d+:\d+ ", re.MULTILINE)


def _kjv() -> str:
    bible = shutil.which("bible")
    if bible is None:
        raise ConfigError("corpus='kjv' needs the Debian package bible-kjv: run `apt-get install -y bible-kjv`, "
                          "or pass --corpus fortunes|lee|PATH.txt")
    text = subprocess.run([bible, "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    return _VERSE_REF.sub("", text)


def _fortunes() -> str:
    files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and p.suffix == "") if FORTUNES_DIR.is_dir() else []
    if not files:
        raise ConfigError(f"corpus='fortunes' needs the Debian package fortunes ({FORTUNES_DIR} is empty): run "
                          "`apt-get install -y fortunes`, or pass --corpus kjv|lee|PATH.txt")
    entries = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        entries.extend(e.strip() for e in re.split(r"^%$", text, flags=re.MULTILINE) if e.strip())
    return "\n\n".join(entries)


def _lee() -> str:
    spec = importlib.util.find_spec("gensim")  # located, never imported: gensim's import is slow and heavy
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("corpus='lee' needs the gensim wheel: `pip install gensim`, or pass --corpus kjv|fortunes|PATH.txt")
    return (Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor").read_text()


def load_corpus(name: str) -> str:
    """The text of a named offline corpus (`kjv`, `fortunes`, `lee`) or of a UTF-8 file path."""
    if name in CORPORA:
        return {"kjv": _kjv, "fortunes": _fortunes, "lee": _lee}[name]()
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"corpus={name!r} is neither one of {CORPORA} nor an existing text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"corpus file {name!r} is empty")
    return text


def encode_bytes(text: str) -> torch.Tensor:
    """Byte-level tokens (vocabulary 256): no tokenizer files needed, any text round-trips."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode_bytes(tokens: torch.Tensor) -> str:
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")
