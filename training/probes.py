"""Fact probes as data: a prompt template, a table of (subject, answer) pairs and a matcher.

    probe = atomic_number_probe()                 # 118 elements from the mendeleev database
    probe = load_probe("capitals.json")           # or a CSV table with a template given
    probe.prompts()                               # [("The atomic number of Gold is", "79"), ...]
    probe.correct("79", " 79. Gold is a ...")     # True

A probe file is JSON:

    {"name": "capitals", "template": "The capital of {subject} is", "matcher": "string",
     "pairs": [["France", "Paris"], ["Peru", "Lima"]],
     "train_templates": ["The capital city of {subject} is"]}      (optional)

or a CSV table with a header `subject,answer` (the template and matcher then come from the
caller: `load_probe("table.csv", template="The capital of {subject} is")`; `membank eval
--domain` takes JSON probes, which carry their template).

Matchers compare the answer with the model's greedy continuation:
  int     the first integer in the continuation equals the answer ("44" matches " 44." but not
          " 441" or " 4");
  string  the continuation, stripped of leading whitespace, starts with the answer followed by a
          non-word character or the end ("Au" matches " Au." but not " Aurum").
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

MATCHERS = ("int", "string")


@dataclass(frozen=True)
class Probe:
    name: str
    template: str                      # contains "{subject}" once
    pairs: tuple[tuple[str, str], ...]  # (subject, answer)
    matcher: str = "string"
    # optional: the fact's phrasings as the training text says them, cut before the answer
    # ("The atomic number for {subject} is"): the evaluation asks the anchor these to show
    # whether it holds the facts at all, held-out template aside
    train_templates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.template.count("{subject}") != 1:
            raise ValueError(f"probe {self.name!r}: "
                             f"template must contain {{subject}} exactly once, "
                             f"got {self.template!r}")
        for t in self.train_templates:
            if t.count("{subject}") != 1:
                raise ValueError(f"probe {self.name!r}: train template {t!r} "
                                 f"must contain {{subject}} once")
        if self.matcher not in MATCHERS:
            raise ValueError(f"probe {self.name!r}: matcher must be one of {', '.join(MATCHERS)}, "
                             f"got {self.matcher!r}")
        if not self.pairs:
            raise ValueError(f"probe {self.name!r} has no (subject, answer) pairs")
        subjects = [s for s, _ in self.pairs]
        if len(set(subjects)) != len(subjects):
            dup = next(s for s in subjects if subjects.count(s) > 1)
            raise ValueError(f"probe {self.name!r}: subject {dup!r} appears more than once")
        for subject, answer in self.pairs:
            if not subject.strip() or not answer.strip():
                raise ValueError(f"probe {self.name!r}: empty subject or answer "
                                 f"in {(subject, answer)!r}")
            if self.matcher == "int" and not re.fullmatch(r"-?\d+", answer.strip()):
                raise ValueError(f"probe {self.name!r}: answer {answer!r} of {subject!r} "
                                 f"is not an integer")

    @property
    def subjects(self) -> list[str]:
        return [s for s, _ in self.pairs]

    def prompt(self, subject: str) -> str:
        return self.template.replace("{subject}", subject)

    def prompts(self) -> list[tuple[str, str]]:
        return [(self.prompt(s), a) for s, a in self.pairs]

    def held_out_pattern(self) -> re.Pattern:
        """Matches the template's prompt for any subject: the training text must not contain it,
        so the model answers from knowledge, not from a memorised string."""
        before, after = (re.escape(part) for part in self.template.split("{subject}"))
        return re.compile(before + r".{1,80}?" + after)

    def correct(self, answer: str, continuation: str) -> bool:
        return match(self.matcher, answer, continuation)


def match(matcher: str, answer: str, continuation: str) -> bool:
    if matcher == "int":
        found = re.search(r"-?\d+", continuation)
        return found is not None and found.group() == answer.strip()
    if matcher == "string":
        text = continuation.lstrip()
        want = answer.strip()
        return text.startswith(want) and (len(text) == len(want) or not (text[len(want)].isalnum()
                                                                         or text[len(want)] == "_"))
    raise ValueError(f"unknown matcher {matcher!r}")


# ---------------------------------------------------------------------------------------------
# the probes membank ships, and probes from files


def atomic_number_probe() -> Probe:
    """PAPER.md section 7: "The atomic number of {element} is", 118 elements, exact integer."""
    from training.data import element_rows

    pairs = tuple((row["name"], str(row["atomic_number"])) for row in element_rows())
    return Probe("atomic-number", "The atomic number of {subject} is", pairs, "int")


BUILTIN = {"atomic-number": atomic_number_probe}


def load_probe(source: str, *, template: str | None = None, matcher: str | None = None,
               name: str | None = None) -> Probe:
    """A built-in probe by name, or a JSON / CSV file (see the module docstring). `template`,
    `matcher` and `name` override the file's (a CSV file needs `template`)."""
    if source in BUILTIN:
        probe = BUILTIN[source]()
        return Probe(name or probe.name, template or probe.template, probe.pairs,
                     matcher or probe.matcher)
    path = Path(source)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"probe {source!r} is neither a built-in probe "
                                f"({', '.join(BUILTIN)}) nor a file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"probe file {path} is not UTF-8 (byte {e.start})") from None
    if path.suffix.lower() == ".csv":
        pairs = _csv_pairs(path, text)
        if template is None:
            raise ValueError(f"probe file {path} is a CSV table: give the prompt template too "
                             f"(or use a JSON probe file, which holds it)")
        return Probe(name or path.stem, template, pairs, matcher or "string")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"probe file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise ValueError(f'probe file {path} must be an object with "template" and a "pairs" list')
    pairs = []
    for i, pair in enumerate(data["pairs"]):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, (str, int)) for v in pair)):
            raise ValueError(f"probe file {path}: pair {i} must be [subject, answer], got {pair!r}")
        pairs.append((str(pair[0]), str(pair[1])))
    tmpl = template or data.get("template")
    if not isinstance(tmpl, str):
        raise ValueError(f'probe file {path} has no "template" string')
    train_templates = data.get("train_templates", [])
    if not (isinstance(train_templates, list) and all(isinstance(t, str) for t in train_templates)):
        raise ValueError(f'probe file {path}: "train_templates" must be a list of strings')
    return Probe(name or str(data.get("name", path.stem)), tmpl, tuple(pairs),
                 matcher or str(data.get("matcher", "string")), tuple(train_templates))


def _csv_pairs(path: Path, text: str) -> tuple[tuple[str, str], ...]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["subject", "answer"]:
        raise ValueError(f"probe file {path} must start with the header 'subject,answer'")
    pairs = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) < 2:
            raise ValueError(f"probe file {path} line {lineno}: expected subject,answer, "
                             f"got {row!r}")
        pairs.append((row[0].strip(), row[1].strip()))
    return tuple(pairs)
