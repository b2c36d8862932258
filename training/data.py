"""A small real corpus: one document per prose field per chemical element, plus fact sheets.

The source is the SQLite database that ships inside the `mendeleev` package (no network). For
each of the 118 elements we emit:

  description   the element's description paragraph          (109 elements have one)
  uses          what it is used for                          (112)
  sources       where it is found / how it is made           (118)
  discovery     who discovered it, when and where            (118)
  name_origin   where the name comes from                    (118)
  properties    physical properties (density, melting point, configuration, series)
  facts         fact sentences in a few phrasings, always including
                "The atomic number of {Name} is {Z}." (the probe of PAPER.md section 7)

Prose fields often do not name their element ("Hard white metallic transition element. ..."),
so every document is prefixed with its subject: the embedder then places an element's documents
near each other and near the probe prompt "The atomic number of {Name} is".

`probe_prompts()` gives the 118 (prompt, answer) pairs of the atomic-number probe.

Run `python -m training.data` to print corpus statistics and a few documents.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

KINDS = ("description", "uses", "sources", "discovery", "name_origin", "properties", "facts")


@dataclass(frozen=True)
class Document:
    text: str
    subject: str  # element name, e.g. "Ruthenium"
    kind: str     # one of KINDS


def _clean(value) -> str | None:
    """Collapse whitespace; None for missing values (None, NaN, empty string)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = re.sub(r"\s+", " ", str(value)).strip()
    return text or None


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


def _prefixed(prefix: str, value) -> str | None:
    """A prose field as a sentence that names its subject; None when the field is empty."""
    text = _clean(value)
    return None if text is None else prefix + _sentence(text)


def _load_tables() -> tuple[list[dict], dict[int, str], dict[int, float]]:
    """Element rows (sorted by Z), series id -> series name, Z -> melting point in K."""
    # fetch_table reads whole tables at once, far faster than 118 element() calls
    from mendeleev.fetch import fetch_table

    elements = fetch_table("elements").sort_values("atomic_number")
    series_table = fetch_table("series")
    series = dict(zip(series_table["id"], series_table["name"]))
    melting: dict[int, float] = {}
    phases = fetch_table("phasetransitions").sort_values("id")
    for z, mp in zip(phases["atomic_number"], phases["melting_point"]):
        # some elements have one row per allotrope: keep the first one listed
        if _number(mp) is not None and int(z) not in melting:
            melting[int(z)] = float(mp)
    return elements.to_dict("records"), series, melting


def _discovery_text(name: str, row: dict) -> str | None:
    who = _clean(row.get("discoverers"))
    year = _number(row.get("discovery_year"))
    where = _clean(row.get("discovery_location"))
    if who is None and year is None and where is None:
        return None
    if who is not None and who.lower().startswith("known to the ancients"):
        return f"{name} has been known since ancient times."
    parts = [f"{name} was discovered"]
    if who is not None:
        parts.append(f"by {who}")
    if year is not None:
        parts.append(f"in {int(year)}")
    if where is not None:
        parts.append(f"in {where}")
    return " ".join(parts) + "."


def _properties_text(name: str, row: dict, series: dict[int, str],
                     melting: dict[int, float]) -> str:
    z = int(row["atomic_number"])
    out = []
    series_name = (series.get(int(row["series_id"]))
                   if _number(row.get("series_id")) is not None else None)
    if series_name:
        out.append(f"{name} belongs to the {series_name.lower()}.")
    block = _clean(row.get("block"))
    if block:
        out.append(f"It lies in the {block}-block of the periodic table.")
    config = _clean(row.get("electronic_configuration"))
    if config:
        out.append(f"Its electron configuration is {config}.")
    density = _number(row.get("density"))
    if density is not None:
        out.append(f"Its density is {density:g} g/cm3.")
    if z in melting:
        out.append(f"It melts at about {melting[z]:.0f} K.")
    if row.get("is_radioactive"):
        out.append(f"{name} is radioactive.")
    return " ".join(out)


def _facts_text(name: str, row: dict, rng: np.random.Generator) -> str:
    z = int(row["atomic_number"])
    symbol = row["symbol"]
    period = int(row["period"])
    weight = _number(row.get("atomic_weight"))
    group = _number(row.get("group_id"))
    # several phrasings of the same facts, so the model sees the probe answer in more than one form
    optional = [
        f"{name} has the chemical symbol {symbol}.",
        f"The chemical symbol of {name} is {symbol}.",
        f"{name} is in period {period} of the periodic table.",
        f"The element with atomic number {z} is {name}.",
        f"{name} ({symbol}) has {z} proton{'s' if z > 1 else ''} in its nucleus.",
        f"Element number {z} in the periodic table is {name}.",
    ]
    if weight is not None:
        optional.append(f"{name} has an atomic weight of about {weight:.1f}.")
    if group is not None:
        optional.append(f"{name} is in group {int(group)} of the periodic table.")
    # the seed picks the order of the optional sentences; the probe sentence always comes first
    order = rng.permutation(len(optional))
    return " ".join([f"The atomic number of {name} is {z}."] + [optional[i] for i in order])


def build_documents(seed: int = 0) -> list[Document]:
    """All documents, element by element (Z = 1..118) in the order of KINDS. Deterministic."""
    rng = np.random.default_rng(seed)
    rows, series, melting = _load_tables()
    docs: list[Document] = []
    for row in rows:
        name = _clean(row["name"])
        texts = {**_prose(name, row, series, melting), "facts": _facts_text(name, row, rng)}
        docs.extend(Document(texts[kind], name, kind) for kind in KINDS if texts[kind])
    return docs


def _prose(name: str, row: dict, series: dict[int, str],
           melting: dict[int, float]) -> dict[str, str | None]:
    """An element's prose documents by kind (None where the database has nothing)."""
    return {
        "description": _prefixed(f"{name}: ", row.get("description")),
        "uses": _prefixed(f"Uses of {name}: ", row.get("uses")),
        "sources": _prefixed(f"Sources of {name}: ", row.get("sources")),
        "discovery": _discovery_text(name, row),
        "name_origin": _prefixed(f"Origin of the name {name}: ", row.get("name_origin")),
        "properties": _properties_text(name, row, series, melting) or None,
    }


def read_jsonl_corpus(path: str | Path) -> list[str]:
    """The texts of a JSONL corpus, one {"text": "..."} object per line (blank lines skipped).

    An empty file, a file that is not UTF-8, a line that is not a JSON object with a string
    "text", or a corpus of only empty texts is a ValueError naming the file (and line).
    """
    return list(iter_jsonl_corpus(path))


def iter_jsonl_corpus(path: str | Path) -> Iterator[str]:
    """`read_jsonl_corpus` as a stream: one line in memory at a time, the same texts and errors
    (an error is raised when the stream reaches the bad line; an empty corpus at its end)."""
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file {path} does not exist") from None
    n, offset = 0, 0
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"corpus file {path} is not UTF-8 "
                                 f"(line {lineno}, byte {offset + e.start})") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"corpus file {path} line {lineno} is not JSON: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'corpus file {path} line {lineno} is not an object '
                                 f'with a string "text"')
            if obj["text"].strip():
                n += 1
                yield obj["text"]
    if not n:
        raise ValueError(f"corpus file {path} is empty (no non-empty texts)")


def probe_prompts() -> list[tuple[str, str]]:
    """("The atomic number of {Name} is", "{Z}") for all 118 elements, in order of Z."""
    rows, _, _ = _load_tables()
    return [(f"The atomic number of {_clean(r['name'])} is", str(int(r["atomic_number"])))
            for r in rows]


if __name__ == "__main__":
    import collections
    import time

    t0 = time.perf_counter()
    documents = build_documents()
    elapsed = time.perf_counter() - t0
    print(f"{len(documents)} documents, {sum(len(d.text) for d in documents):,} characters, "
          f"built in {elapsed:.2f} s")
    print(dict(collections.Counter(d.kind for d in documents)))
    for d in documents[:7]:
        print(f"[{d.subject} / {d.kind}] {d.text}")


def element_rows() -> list[dict]:
    """One clean record per element (Z = 1..118): name, atomic_number, symbol, period, group,
    atomic_weight, and `prose`, the element's non-empty prose documents by kind (the KINDS above
    except "facts"). Used by the long-tail corpus and the atomic-number probe."""
    rows, series, melting = _load_tables()
    out = []
    for row in rows:
        name = _clean(row["name"])
        group = _number(row.get("group_id"))
        prose = _prose(name, row, series, melting)
        out.append({"name": name, "atomic_number": int(row["atomic_number"]),
                    "symbol": row["symbol"], "period": int(row["period"]),
                    "group": int(group) if group is not None else None,
                    "atomic_weight": _number(row.get("atomic_weight")),
                    "prose": {k: v for k, v in prose.items() if v}})
    return out
