"""Operators: comparisons a small model should not make in words, answered deterministically from a fixed template.

A 135M model that has found both dates ("March 8, 1975", "14 January 1987") often still names the wrong one as the
later (`benchmarks/results/recursion_no_operators.md`). An operator does that last step by computation. Each operator has one template, which
the converters write as the last follow-up of a comparison tree (`peftprompt.recursive.sources`) and the model
learns to ask; the runner routes a follow-up in that form to `apply` (through
`peftprompt.selfask.answerers.OperatorAnswerer`) instead of to a retriever or the model:

| operator | template | answer |
|---|---|---|
| ``earlier`` | ``Which is earlier: {a} ({x}) or {b} ({y})?`` | the name whose date is earlier |
| ``later`` | ``Which is later: {a} ({x}) or {b} ({y})?`` | the name whose date is later |
| ``larger`` | ``Which is larger: {a} ({x}) or {b} ({y})?`` | the name whose quantity is larger |
| ``smaller`` | ``Which is smaller: {a} ({x}) or {b} ({y})?`` | the name whose quantity is smaller |
| ``same`` | ``Are these the same: {a} ({x}) and {b} ({y})?`` | ``yes`` when the two values name the same thing |
| ``both`` | ``Are both true: {a} ({x}) and {b} ({y})?`` | ``yes`` when both values are ``yes`` |

``both`` is there because a third of HotpotQA's comparison questions ask whether two things share a property
("Are Steve Perry and Leslie West both singers?"): its follow-ups answer yes or no for each, and the last step is
a conjunction.

Values are parsed, never guessed: dates with `dateutil` (``"March 8, 1975"``, ``"14 January 1987"``,
``"1975"``, ``"March 1975"``) plus the forms it does not read (``"c. 1200"``, ``"5th century BC"``, ``"44 BC"``,
``"the 1980s"``); a date is an interval (``"1975"`` is all of 1975), and two dates whose intervals overlap
(``"1975"`` against ``"March 8, 1975"``) cannot be ordered. Quantities are numbers (``"1,234,567"``,
``"3.5 million"``, ``"seven"``) with an optional unit; only quantities with the same unit (or none) compare.
``same`` compares names after case, punctuation and a leading "the" are dropped and demonyms are read as their
country (``"American"`` = ``"United States"``). Whatever cannot be parsed, a value that is unknown, or two values
of different kinds raises `OperatorError`, whose message says why: the caller passes the follow-up on to the next
answerer.

Example:
    ```py
    >>> from peftprompt.operators import apply, parse_follow_up
    >>> call = parse_follow_up("Which is later: The More the Merrier (March 8, 1975) or Sleep, My Love (14 January 1987)?")
    >>> apply(call).answer
    'Sleep, My Love'
    ```
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional, Union

from dateutil import parser as date_parser

TEMPLATES = {
    "earlier": "Which is earlier: {a} ({x}) or {b} ({y})?",
    "later": "Which is later: {a} ({x}) or {b} ({y})?",
    "larger": "Which is larger: {a} ({x}) or {b} ({y})?",
    "smaller": "Which is smaller: {a} ({x}) or {b} ({y})?",
    "same": "Are these the same: {a} ({x}) and {b} ({y})?",
    "both": "Are both true: {a} ({x}) and {b} ({y})?",
}
"""Each operator's follow-up, with the two names ``{a}``, ``{b}`` and their values ``{x}``, ``{y}``."""

KINDS = {"earlier": "date", "later": "date", "larger": "quantity", "smaller": "quantity", "same": "name",
         "both": "yes/no"}
"""The kind of value each operator reads."""


def _template_pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{[abxy]\})", template)
    groups = {"{a}": r"(?P<a>.+?)", "{b}": r"(?P<b>.+)", "{x}": r"(?P<x>[^()]*)", "{y}": r"(?P<y>[^()]*)"}
    return re.compile("^" + "".join(groups.get(p, re.escape(p)) for p in parts) + "$", re.IGNORECASE)


PATTERNS = {name: _template_pattern(template) for name, template in TEMPLATES.items()}
OPENINGS = {name: template.split("{a}")[0].strip().lower() for name, template in TEMPLATES.items()}
"""Each template's fixed opening (``"which is later:"``): a follow-up that starts with one asks for that operator."""


class OperatorError(ValueError):
    """An operator's values cannot be compared (unparsable, unknown or of different kinds); the message says why."""


@dataclass(frozen=True)
class OperatorCall:
    """A follow-up in an operator's template: the operator and its two ``(name, value)`` operands."""

    operator: str
    names: tuple[str, str]
    values: tuple[str, str]

    @property
    def question(self) -> str:
        """The follow-up in the operator's template."""
        return format_follow_up(self.operator, self.names, self.values)


@dataclass
class OperatorResult:
    """What `apply` computed: the `answer` and how each value was read (`parsed`, for the trace)."""

    call: OperatorCall
    answer: str
    parsed: list[str] = field(default_factory=list)

    def to_meta(self) -> dict:
        """The trace's record of the step: operator, operands as written, as parsed, and the answer."""
        return {"operator": self.call.operator, "operands": [list(p) for p in zip(self.call.names, self.call.values)],
                "parsed": self.parsed, "operator_answer": self.answer}


def format_follow_up(operator: str, names: tuple[str, str], values: tuple[str, str]) -> str:
    """`operator`'s follow-up for two names and their values (`TEMPLATES`)."""
    if operator not in TEMPLATES:
        raise KeyError(f"unknown operator {operator!r}; choose one of {', '.join(TEMPLATES)}")
    (a, b), (x, y) = names, values
    return TEMPLATES[operator].format(a=a.strip(), b=b.strip(), x=x.strip(), y=y.strip())


def asked_operator(question: str) -> Optional[str]:
    """The operator a follow-up asks for by its opening (``"Which is later: ..."`` -> ``later``), whether or not
    the rest is in the template's form; `None` for any other follow-up."""
    text = " ".join(question.split()).lower()
    return next((name for name, opening in OPENINGS.items() if text.startswith(opening)), None)


def parse_follow_up(question: str) -> Optional[OperatorCall]:
    """The `OperatorCall` a follow-up in one of `TEMPLATES` stands for, or `None` when it is in none of them."""
    text = " ".join(question.split())
    for name, pattern in PATTERNS.items():
        match = pattern.match(text)
        if match:
            return OperatorCall(name, (match["a"].strip(), match["b"].strip()), (match["x"].strip(), match["y"].strip()))
    return None


# ---------------------------------------------------------------------------------------------------------- dates ---
@dataclass(frozen=True)
class DateValue:
    """A date as the interval it names, ``(year, month, day)`` from `start` to `end` inclusive (years BC < 1)."""

    start: tuple[int, int, int]
    end: tuple[int, int, int]

    def __str__(self) -> str:
        def show(d: tuple[int, int, int]) -> str:
            return f"{d[0]:04d}-{d[1]:02d}-{d[2]:02d}" if d[0] > 0 else f"{1 - d[0]} BC-{d[1]:02d}-{d[2]:02d}"

        return show(self.start) if self.start == self.end else f"{show(self.start)}..{show(self.end)}"


def _years(first: int, last: int) -> DateValue:
    return DateValue((first, 1, 1), (last, 12, 31))


_APPROXIMATE = re.compile(r"^(?:c\.|ca\.|circa|about|around|approximately|approx\.)\s*", re.IGNORECASE)
_ERA = re.compile(r"^(?P<n>\d{1,4})\s*(?P<era>BC|BCE|B\.C\.|AD|CE|A\.D\.)$|^(?:AD|A\.D\.)\s*(?P<n2>\d{1,4})$",
                  re.IGNORECASE)
_CENTURY = re.compile(r"^(?:the\s+)?(?P<n>\d{1,2})(?:st|nd|rd|th)\s+century(?:\s+(?P<era>BC|BCE|AD|CE))?$",
                      re.IGNORECASE)
_DECADE = re.compile(r"^(?:the\s+)?(?P<n>\d{3})0s$", re.IGNORECASE)
_YEAR = re.compile(r"^\d{1,4}$")
_DEFAULTS = (datetime(2000, 1, 1), datetime(2004, 12, 28))  # differ in every field: what dateutil filled in shows


def _year(n: int, era: Optional[str]) -> int:
    """Astronomical year numbering: 1 BC is 0, 44 BC is -43."""
    return 1 - n if era and era.upper().replace(".", "") in ("BC", "BCE") else n


def parse_date(text: str) -> DateValue:
    """A date in the forms the data sets use, as the interval it names.

    Raises:
        OperatorError: The text is not a date with a year (``"Norway"``, ``"May 14"``, ``"unknown"``), or names
            two dates (``"May 14, 2016 and February 10, 2017"``).
    """
    value = " ".join(str(text).split()).strip(" .,;")
    value = _APPROXIMATE.sub("", value)
    if not value:
        raise OperatorError("empty date")
    if _YEAR.match(value):
        return _years(int(value), int(value))
    if match := _ERA.match(value):
        n = int(match["n"] or match["n2"])
        year = _year(n, match["era"])
        return _years(year, year)
    if match := _CENTURY.match(value):
        n, bc = int(match["n"]), (match["era"] or "").upper() in ("BC", "BCE")
        first, last = (100 * (n - 1) + 1, 100 * n) if not bc else (_year(100 * n, "BC"), _year(100 * (n - 1) + 1, "BC"))
        return _years(first, last)
    if match := _DECADE.match(value):
        first = int(match["n"]) * 10
        return _years(first, first + 9)
    if re.search(r"\b(?:and|or|to|until|between)\b|[–—]|\d\s*-\s*\d{4}", value, re.IGNORECASE):
        raise OperatorError(f"{text!r} names more than one date")
    try:
        readings = [date_parser.parse(value, default=default) for default in _DEFAULTS]
    except (ValueError, OverflowError) as err:
        raise OperatorError(f"cannot read {text!r} as a date") from err
    first, second = readings
    if first.year != second.year:
        raise OperatorError(f"{text!r} has no year")
    if first.month != second.month:
        return _years(first.year, first.year)
    if first.day != second.day:
        last = calendar.monthrange(first.year, first.month)[1]
        return DateValue((first.year, first.month, 1), (first.year, first.month, last))
    day = (first.year, first.month, first.day)
    return DateValue(day, day)


# ----------------------------------------------------------------------------------------------------- quantities ---
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
                     "hundred": 100, "a hundred": 100, "a dozen": 12, "dozen": 12})
SCALES = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12, "k": 1e3, "m": 1e6, "bn": 1e9}
_QUANTITY = re.compile(
    r"^(?:about|around|approximately|approx\.|over|nearly|almost|some|c\.|ca\.)?\s*"
    r"(?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[a-z]+(?:[ -][a-z]+)?)"
    r"\s*(?P<scale>thousand|million|billion|trillion|bn)?\b\s*(?P<unit>[^\d\s].*)?$",
    re.IGNORECASE)


@dataclass(frozen=True)
class Quantity:
    """A number and its unit (lower case, ``""`` when none)."""

    value: float
    unit: str = ""

    def __str__(self) -> str:
        number = f"{self.value:,.0f}" if self.value == int(self.value) else f"{self.value:,}"
        return f"{number} {self.unit}".strip()


def same_unit(a: str, b: str) -> bool:
    """Whether two units are one (``"species"`` and ``"species"``, ``"album"`` and ``"albums"``)."""
    return a.rstrip("s") == b.rstrip("s")


def parse_quantity(text: str) -> Quantity:
    """A number with an optional scale word and unit: ``"1,234,567"``, ``"3.5 million"``, ``"seven"``,
    ``"6,000 km"``.

    Raises:
        OperatorError: No number, or a range (``"9–11 inches"``) or several numbers.
    """
    value = " ".join(str(text).split()).strip(" .;")
    match = _QUANTITY.match(value)
    if not match:
        raise OperatorError(f"cannot read {text!r} as a quantity")
    number, unit = match["number"], match["unit"] or ""
    if number[0].isalpha():
        if number.lower() not in NUMBER_WORDS:
            raise OperatorError(f"cannot read {text!r} as a quantity")
        amount = float(NUMBER_WORDS[number.lower()])
    else:
        amount = float(number.replace(",", ""))
    if re.search(r"\d", unit) or re.match(r"^(?:to|or|and)\b|^[–—-]", unit):
        raise OperatorError(f"{text!r} names more than one quantity")
    if match["scale"]:
        amount *= SCALES[match["scale"].lower()]
    return Quantity(amount, " ".join(unit.lower().strip(" .").split()))


# ---------------------------------------------------------------------------------------------------------- names ---
DEMONYMS = {
    "american": "united states", "british": "united kingdom", "english": "united kingdom", "scottish": "united kingdom",
    "welsh": "united kingdom", "french": "france", "german": "germany", "italian": "italy", "spanish": "spain",
    "portuguese": "portugal", "dutch": "netherlands", "belgian": "belgium", "swiss": "switzerland",
    "austrian": "austria", "swedish": "sweden", "norwegian": "norway", "danish": "denmark", "finnish": "finland",
    "icelandic": "iceland", "irish": "ireland", "polish": "poland", "czech": "czech republic", "slovak": "slovakia",
    "hungarian": "hungary", "romanian": "romania", "bulgarian": "bulgaria", "greek": "greece", "turkish": "turkey",
    "russian": "russia", "ukrainian": "ukraine", "serbian": "serbia", "croatian": "croatia", "slovenian": "slovenia",
    "canadian": "canada", "mexican": "mexico", "brazilian": "brazil", "argentine": "argentina",
    "argentinian": "argentina", "chilean": "chile", "colombian": "colombia", "peruvian": "peru",
    "cuban": "cuba", "australian": "australia", "new zealander": "new zealand", "indian": "india",
    "pakistani": "pakistan", "bangladeshi": "bangladesh", "sri lankan": "sri lanka", "nepali": "nepal",
    "chinese": "china", "japanese": "japan", "korean": "south korea", "south korean": "south korea",
    "north korean": "north korea", "filipino": "philippines", "indonesian": "indonesia", "thai": "thailand",
    "vietnamese": "vietnam", "malaysian": "malaysia", "iranian": "iran", "persian": "iran", "iraqi": "iraq",
    "israeli": "israel", "egyptian": "egypt", "nigerian": "nigeria", "south african": "south africa",
    "kenyan": "kenya", "ethiopian": "ethiopia", "moroccan": "morocco", "algerian": "algeria", "syrian": "syria",
    "lebanese": "lebanon", "saudi": "saudi arabia", "afghan": "afghanistan", "georgian": "georgia",
    "armenian": "armenia", "azerbaijani": "azerbaijan", "estonian": "estonia", "latvian": "latvia",
    "lithuanian": "lithuania", "belarusian": "belarus", "soviet": "soviet union", "yugoslav": "yugoslavia",
}
"""Demonyms read as their country by ``same`` (the data sets mix "American" and "United States")."""
COUNTRY_NAMES = {
    "united states of america": "united states", "usa": "united states", "us": "united states",
    "u s": "united states", "u s a": "united states", "america": "united states", "uk": "united kingdom",
    "great britain": "united kingdom", "britain": "united kingdom", "england": "united kingdom",
    "scotland": "united kingdom", "wales": "united kingdom", "czechia": "czech republic", "ussr": "soviet union",
    "republic of ireland": "ireland", "people s republic of china": "china", "korea": "south korea",
    "kingdom of italy": "italy", "russian empire": "russia", "german empire": "germany",
}
"""Other names of the same country."""
UNKNOWN_VALUES = frozenset({"", "unknown", "none", "n a", "not known", "no answer"})
DISAMBIGUATION = re.compile(r"^(?:\d{4} )?(?:[a-z]+ )?(?:film|band|album|novel|song|play|tv series|series|magazine|book|"
                            r"director|actor|actress|musician|singer|politician|footballer|village|city)$")
"""What Wikipedia puts in parentheses after a title (``"Kick-Ass 2 (film)"``): a name's part, never a value."""


def _words(text: str) -> str:
    """`text` lower-cased, punctuation read as spaces, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


def name_key(text: str) -> str:
    """A name compared by ``same``: lower case, punctuation dropped, no leading "the", demonyms and other names of
    a country read as that country (`DEMONYMS`, `COUNTRY_NAMES`)."""
    key = re.sub(r"^the ", "", _words(text))
    key = DEMONYMS.get(key, key)
    return COUNTRY_NAMES.get(key, key)


def yes_no(text: str) -> bool:
    """``yes`` / ``no`` (any case, trailing punctuation) as a bool.

    Raises:
        OperatorError: Anything else.
    """
    key = _words(text)
    if key in ("yes", "true"):
        return True
    if key in ("no", "false"):
        return False
    raise OperatorError(f"{text!r} is not yes or no")


# ----------------------------------------------------------------------------------------------------- operators ---
Parsed = Union[DateValue, Quantity, str, bool]


def parse_value(kind: str, text: str) -> Parsed:
    """`text` read as a value of `kind` (``date``, ``quantity``, ``name`` or ``yes/no``)."""
    key = name_key(text)
    if key in UNKNOWN_VALUES:
        raise OperatorError(f"value {text!r} is unknown")
    if DISAMBIGUATION.match(key):
        raise OperatorError(f"{text!r} is part of a title, not a value")
    if kind == "date":
        return parse_date(text)
    if kind == "quantity":
        return parse_quantity(text)
    if kind == "yes/no":
        return yes_no(text)
    return key


def apply(call: OperatorCall) -> OperatorResult:
    """Compute `call`'s answer.

    Raises:
        OperatorError: A value cannot be parsed or is unknown, two quantities have different units, or two dates
            overlap so neither is earlier (or later).
    """
    kind = KINDS[call.operator]
    x, y = (parse_value(kind, value) for value in call.values)
    first, second = call.values
    parsed = [str(x), str(y)]
    if kind == "name":
        return OperatorResult(call, "yes" if x == y else "no", parsed)
    if kind == "yes/no":
        return OperatorResult(call, "yes" if x and y else "no", parsed)
    if kind == "date":
        if not (x.end < y.start or y.end < x.start):
            raise OperatorError(f"dates {first!r} and {second!r} overlap: neither is {call.operator}")
        low = 0 if x.end < y.start else 1  # the earlier one
    else:
        if not same_unit(x.unit, y.unit):
            raise OperatorError(f"quantities {first!r} and {second!r} have different units")
        if x.value == y.value:
            raise OperatorError(f"quantities {first!r} and {second!r} are equal")
        low = 0 if x.value < y.value else 1  # the smaller one
    pick = low if call.operator in ("earlier", "smaller") else 1 - low
    return OperatorResult(call, call.names[pick], parsed)


# --------------------------------------------------------------------------------------- the question's wording ---
EARLIER_WORDS = re.compile(r"\b(?:first|earlier|earliest|older|oldest|before|sooner|predates?)\b", re.IGNORECASE)
LATER_WORDS = re.compile(r"\b(?:later|latest|last|younger|youngest|more recent(?:ly)?|most recent(?:ly)?|after|newer)\b",
                    re.IGNORECASE)
_LARGER = re.compile(r"\b(?:more|most|larger|largest|bigger|biggest|greater|greatest|taller|tallest|higher|highest|"
                     r"longer|longest|heavier|older)\b", re.IGNORECASE)
_SMALLER = re.compile(r"\b(?:fewer|fewest|less|least|smaller|smallest|shorter|shortest|lower|lowest|lighter)\b",
                      re.IGNORECASE)
_SAME = re.compile(r"\b(?:same|both from|share)\b", re.IGNORECASE)


def operator_for(question: str, kind: str) -> Optional[str]:
    """The operator a comparison question asks for once its values of `kind` are known: ``"Who was born first,
    A or B?"`` with dates -> ``earlier``; ``"Which film has the director who died later, ..."`` -> ``later``;
    ``"Are A and B from the same country?"`` with names -> ``same``; ``"Are A and B both singers?"`` with yes/no
    answers -> ``both``. `None` when the wording does not say (or says both ways)."""
    if kind == "date":
        found = {op for op, pattern in (("earlier", EARLIER_WORDS), ("later", LATER_WORDS)) if pattern.search(question)}
    elif kind == "quantity":
        found = {op for op, pattern in (("larger", _LARGER), ("smaller", _SMALLER)) if pattern.search(question)}
    elif kind == "name":
        found = {"same"} if _SAME.search(question) else set()
    else:
        found = {"both"} if re.search(r"\bboth\b", question, re.IGNORECASE) else set()
    return found.pop() if len(found) == 1 else None


__all__ = ["DEMONYMS", "KINDS", "TEMPLATES", "DateValue", "OperatorCall", "OperatorError", "OperatorResult",
           "Quantity", "apply", "format_follow_up", "name_key", "operator_for", "parse_date",
           "asked_operator", "parse_follow_up", "parse_quantity", "parse_value", "yes_no"]
