"""Griffe extension: turn each dataclass's fields into an "Attributes" table on its docs page.

rankwise docstrings describe config fields in prose lines ("r: rank of each base ..."). This
extension reads the fields from the dataclass itself (name, annotation, default: never copied by
hand, so the page cannot drift from the code), takes each field's description from the matching
"name: ..." line of the class docstring when there is one, and appends a Google-style
"Attributes:" section, which mkdocstrings renders as a table. Lines consumed this way are removed
from the prose so the text is not shown twice.
"""
from __future__ import annotations

import re

import griffe

_FIELD_LINE = re.compile(r"^(?P<names>[A-Za-z_]\w*(?:\s*[/,]\s*[A-Za-z_]\w*)*)\s*:\s+(?P<text>\S.*)$")
_SECTION_WORDS = {"args", "arguments", "parameters", "returns", "raises", "attributes", "example", "examples",
                  "note", "notes", "warning", "warnings", "yields", "see also", "references"}


def _is_dataclass(cls: griffe.Class) -> bool:
    return "dataclass" in cls.labels or any("dataclass" in str(d.value) for d in cls.decorators)


def _fields(cls: griffe.Class) -> list[griffe.Attribute]:
    out = []
    for member in cls.members.values():
        if member.is_alias or not member.is_attribute or member.name.startswith("_"):
            continue
        # griffe strips `ClassVar[...]` from the annotation and labels such members class-attributes only
        if not member.annotation or "instance-attribute" not in member.labels:
            continue
        out.append(member)
    return out


def _split_prose(text: str, names: set[str]) -> tuple[list[str], dict[str, str]]:
    """Split docstring text into the lines kept as prose and {field: description} for field lines."""
    kept, found = [], {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FIELD_LINE.match(lines[i])
        keys = [k.strip() for k in re.split(r"[/,]", match["names"])] if match else []
        if keys and all(k in names for k in keys) and match["names"].lower() not in _SECTION_WORDS:
            description = [match["text"].strip()]
            i += 1
            while i < len(lines) and lines[i].startswith((" ", "\t")) and lines[i].strip():
                description.append(lines[i].strip())
                i += 1
            desc = " ".join(description)
            if len(keys) > 1:
                desc = f"({' / '.join(keys)}) {desc}"
            for key in keys:
                found[key] = desc
            continue
        kept.append(lines[i])
        i += 1
    return kept, found


def _trailing_comment(field: griffe.Attribute) -> str:
    """`x: int = 1  # why` -> "why" (fields documented by a comment on their own line of source)."""
    try:
        line = field.lines[0] if field.lines else ""
    except Exception:  # no source available (compiled module)
        return ""
    code, sep, comment = line.partition("  #")
    return comment.strip() if sep and ":" in code else ""


def _escape_stars(text: str) -> str:
    """`r*N` in prose would open markdown emphasis; code spans (between backticks) are left alone."""
    parts = text.split("`")
    return "`".join(p.replace("*", "\\*") if i % 2 == 0 else p for i, p in enumerate(parts))


def _default_text(value) -> str:
    """The default as a reader would write it: `field(default_factory=dict)` -> `dict()`."""
    text = _one_line(str(value))
    match = re.fullmatch(r"(?:dataclasses\.)?field\((.*)\)", text)
    if not match:
        return text
    args = match[1]
    factory = re.search(r"default_factory\s*=\s*(lambda\s*:\s*)?(.+?)\s*(?:,\s*\w+\s*=|$)", args)
    if factory:
        return factory[2] if factory[1] else f"{factory[2]}()"
    plain = re.search(r"(?<!_)default\s*=\s*(.+?)\s*(?:,\s*\w+\s*=|$)", args)
    return plain[1] if plain else text


def _one_line(value: str) -> str:
    return " ".join(value.split())


class ConfigFields(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        classes = [c for c in self._classes(pkg) if _is_dataclass(c)]
        # read every docstring before rewriting any: a subclass takes inherited fields' text from its bases
        self.original = {c.path: (c.docstring.value if c.docstring else "") for c in classes}
        for cls in classes:
            self._document(cls)

    def _classes(self, obj):
        for member in list(obj.members.values()):
            if member.is_alias:
                continue
            if member.is_class:
                yield member
                yield from self._classes(member)
            elif member.is_module:
                yield from self._classes(member)

    def _lineage(self, cls: griffe.Class) -> list[griffe.Class]:
        """The dataclass bases first (field order of the generated __init__), then the class itself."""
        try:
            bases = [b for b in cls.mro() if isinstance(b, griffe.Class) and _is_dataclass(b)]
        except Exception:  # unresolvable (external) bases: own fields only
            bases = []
        return list(reversed(bases)) + [cls]

    def _document(self, cls: griffe.Class) -> None:
        rows, seen = {}, set()
        kept_prose = None
        for owner in self._lineage(cls):
            fields = _fields(owner)
            text = self.original.get(owner.path, "")
            kept, found = _split_prose(text, {f.name for f in fields})
            if owner is cls:
                kept_prose = kept
            for field in fields:
                desc = _escape_stars(found.get(field.name, "") or _trailing_comment(field))
                default = field.value
                default_text = f"Default: `{_default_text(default)}`." if default is not None else "Required."
                if desc and not desc.endswith((".", "!", "?")):
                    desc += "."
                desc = (desc + " " if desc else "") + default_text
                rows[field.name] = f"    {field.name} ({_one_line(str(field.annotation))}): {desc}"
        if not rows:
            return
        body = "\n".join(kept_prose or []).rstrip()
        new = (body + "\n\n" if body else "") + "Attributes:\n" + "\n".join(rows.values())
        if cls.docstring:
            cls.docstring.value = new
        else:
            cls.docstring = griffe.Docstring("", parent=cls, parser="google")
            cls.docstring.value = new  # set after construction: the constructor's cleandoc would dedent the rows
