"""PII detection and redaction: emails, phone numbers, US SSNs, payment cards, IBANs, IP addresses, personal names.

Every structured type is found by a pattern and then *validated* (phone numbers by libphonenumber, cards by Luhn
plus issuer prefix and length, IBANs by country length plus mod-97, SSNs by the SSA's never-issued ranges, IPs by
`ipaddress`), because support data is full of digit strings that are not PII: order numbers, tracking ids, dates,
prices. Those are the false positives that would otherwise shred a training set, so digit runs directly after an
order/tracking/invoice keyword are never taken for phones or cards.

Names (`PERSON`) are found by context, the way support text carries them: a sign-off ("Regards, Priya"), a
salutation ("Hi John," "Dear Ms. Okafor"), an introduction ("my name is …", "this is Sarah", "I'm Ole") or a title
("Mr. Smith"). A word in those places counts as a name when it is a known given name (or, after a sign-off or
salutation, a known family name) from Faker's person providers — about 31,000 given names across 80+ locales,
shipped with the package, no network. Words that are also ordinary words ("Will do", "May I", "Mark as read",
"Best regards, Support Team") are names only where nothing but punctuation, a line end or a family name follows.
"my name is", "call me" and titles take any capitalised word. Names outside these contexts need a NER model.

`find_pii(text)` -> [(type, start, end, value)], `redact(text)` -> (text with `<TYPE>` placeholders, {TYPE: n}).
The privacy probe scans model generations with the same functions. `engine="presidio"` adds PERSON and LOCATION
through Microsoft Presidio's NER when it is installed.
"""

from __future__ import annotations

import importlib
import ipaddress
import pkgutil
import re
from functools import lru_cache
from typing import NamedTuple, Optional

import phonenumbers

from gemtune.errors import UserError

PII_TYPES = ("EMAIL", "PHONE", "SSN", "CREDIT_CARD", "IBAN", "IP_ADDRESS")  # structured, validated types
NER_TYPES = ("PERSON", "LOCATION")


class PiiMatch(NamedTuple):
    type: str
    start: int
    end: int
    value: str


def placeholder(kind: str) -> str:
    return f"<{kind}>"


# ---------------------------------------------------------------------------------------------------- patterns
_EMAIL = re.compile(
    r"(?<![\w.%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|\bversion|\bver\.?|\brelease|\bbuild|\bsection|\bclause|\bchapter|\bparagraph|\bstep|§)\s*$")
_SSN = re.compile(r"(?<![\w\-])(\d{3})([\- ])(\d{2})\2(\d{4})(?![\w\-]|\.\d)")
_SSN_BARE = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?| #)?)\s*(?:is|:|#|=)?\s*(\d{9})(?!\d)")
_CARD = re.compile(r"(?<![\w\-])(?<!\d )\d(?:[ \-]?\d){12,18}(?!\w)(?![ \-]\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,32}")
_PHONE = re.compile(r"(?<![\w+#/.\-])(?:\+ ?)?(?:\(\d{1,4}\) ?)?\d[\d ().\-]{5,18}\d(?!\w|[.\-/]\d)")
# "(123) 456-7890" is a phone number by its shape even when the area code is fictitious.
_NANP_SHAPE = re.compile(r"\(\d{3}\) ?\d{3}[\-.]\d{4}")
_DATE_LIKE = re.compile(r"\d{4}[\-./ ]\d{1,2}[\-./ ]\d{1,2}|\d{1,2}[\-./ ]\d{1,2}[\-./ ]\d{4}")
# Identifiers that look like phones or cards. Matched against the text just before a candidate.
_ID_CONTEXT = re.compile(
    r"(?i)\b(?:order|invoice|tracking|track|shipment|parcel|package|waybill|awb|consignment|ref|reference|"
    r"confirmation|booking|reservation|ticket|case|transaction|txn|receipt|serial|sku|po|purchase order|"
    r"customer|member|membership|policy|claim|account|acct|imei|isbn|model|part|item|product|"
    r"fedex|ups|usps|dhl)\.?\s*(?:number|num|no\.?|id|code|#)?\s*[:#=]?\s*#?\s*$"
)
_QUICK = re.compile(r"[@:]|\d")
_DIGIT = re.compile(r"\d")

# IBAN length per country (SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


# ---------------------------------------------------------------------------------------------------- validators
def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_brand(digits: str) -> Optional[str]:
    """Issuer by prefix, only when the length is one that issuer uses: random digit runs rarely fit both."""
    n = len(digits)
    p2, p4, p6 = int(digits[:2]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or 644 <= p4 // 10 <= 649 or p2 == 65) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (300 <= p4 // 10 <= 305 or p2 in (36, 38, 39)) and 14 <= n <= 19:
        return "diners"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if (p2 in (50, 56, 57, 58) or p4 in (6304, 6759) or p6 in (676770, 676774)) and 13 <= n <= 19:
        return "maestro"
    return None


def _card_grouping_ok(raw: str) -> bool:
    """Cards are written contiguous or in 4-groups (Amex/Diners 4-6-5 / 4-6-4); 3-7-7 is an order number."""
    if raw.isdigit():
        return True
    seps = set(re.findall(r"[ \-]", raw))
    if len(seps) != 1:
        return False
    sizes = [len(g) for g in re.split(r"[ \-]", raw)]
    if sizes in ([4, 6, 5], [4, 6, 4]):
        return True
    return all(s == 4 for s in sizes[:-1]) and 1 <= sizes[-1] <= 4


def iban_ok(iban: str) -> bool:
    cc = iban[:2]
    if IBAN_LENGTHS.get(cc) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    num = "".join(str(int(c, 36)) for c in rearranged)
    return int(num) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


# ---------------------------------------------------------------------------------------------------- detectors
def _overlaps(spans: list[PiiMatch], s: int, e: int) -> bool:
    return any(m.start < e and s < m.end for m in spans)


def _id_context_before(text: str, start: int) -> bool:
    return bool(_ID_CONTEXT.search(text[max(0, start - 40):start]))


def _emails(text: str, out: list[PiiMatch]) -> None:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        out.append(PiiMatch("EMAIL", m.start(), m.end(), m.group()))


def _ibans(text: str, out: list[PiiMatch]) -> None:
    for m in _IBAN.finditer(text):
        cand = m.group()
        want = IBAN_LENGTHS.get(cand[:2])
        if not want:
            continue
        # Walk exactly `want` alphanumerics (single spaces allowed between them): the greedy pattern may have
        # swallowed a following word.
        chars, end = [], m.start()
        for i, c in enumerate(cand):
            if c != " ":
                chars.append(c)
            if len(chars) == want:
                end = m.start() + i + 1
                break
        if len(chars) != want or (end < len(text) and text[end].isalnum()):
            continue
        if iban_ok("".join(chars)) and not _overlaps(out, m.start(), end):
            out.append(PiiMatch("IBAN", m.start(), end, text[m.start():end]))


def _cards(text: str, out: list[PiiMatch]) -> None:
    for m in _CARD.finditer(text):
        raw = m.group()
        digits = re.sub(r"\D", "", raw)
        if not 13 <= len(digits) <= 19 or not _card_grouping_ok(raw):
            continue
        if not luhn_ok(digits) or card_brand(digits) is None:
            continue
        if raw.isdigit() and _id_context_before(text, m.start()):
            continue
        if not _overlaps(out, m.start(), m.end()):
            out.append(PiiMatch("CREDIT_CARD", m.start(), m.end(), raw))


def _ssns(text: str, out: list[PiiMatch]) -> None:
    for m in _SSN.finditer(text):
        if ssn_ok(m.group(1), m.group(3), m.group(4)) and not _overlaps(out, m.start(), m.end()):
            out.append(PiiMatch("SSN", m.start(), m.end(), m.group()))
    for m in _SSN_BARE.finditer(text):
        d = m.group(1)
        s, e = m.start(1), m.end(1)
        if ssn_ok(d[:3], d[3:5], d[5:]) and not _overlaps(out, s, e):
            out.append(PiiMatch("SSN", s, e, d))


def _ips(text: str, out: list[PiiMatch]) -> None:
    if "." in text:
        for m in _IPV4.finditer(text):
            if _VERSION_BEFORE.search(text[max(0, m.start() - 14):m.start()]):
                continue
            if not _overlaps(out, m.start(), m.end()):
                out.append(PiiMatch("IP_ADDRESS", m.start(), m.end(), m.group()))
    if text.count(":") >= 2:
        for m in _IPV6.finditer(text):
            cand = m.group()
            if len(cand) < 3 or not any(c.isalnum() for c in cand):
                continue
            try:
                ipaddress.IPv6Address(cand)
            except ValueError:
                continue
            if not _overlaps(out, m.start(), m.end()):
                out.append(PiiMatch("IP_ADDRESS", m.start(), m.end(), cand))


@lru_cache(maxsize=None)
def _leniency():
    return phonenumbers.Leniency.VALID


def _phones(text: str, out: list[PiiMatch], region: str) -> None:
    """libphonenumber's matcher, run only on digit runs the candidate pattern found (it is slow on whole texts)."""
    for m in _PHONE.finditer(text):
        cand = m.group()
        if sum(c.isdigit() for c in cand) < 7 or _DATE_LIKE.fullmatch(cand.strip()):
            continue
        found_any = False
        for pm in phonenumbers.PhoneNumberMatcher(cand, region, leniency=_leniency()):
            s, e = m.start() + pm.start, m.start() + pm.end
            raw = pm.raw_string
            if _DATE_LIKE.fullmatch(raw) or _id_context_before(text, s) or _overlaps(out, s, e):
                continue
            out.append(PiiMatch("PHONE", s, e, raw))
            found_any = True
        if not found_any:
            for sm in _NANP_SHAPE.finditer(cand):
                s, e = m.start() + sm.start(), m.start() + sm.end()
                if not _overlaps(out, s, e):
                    out.append(PiiMatch("PHONE", s, e, sm.group()))


def find_structured(text: str, region: str = "US") -> list[PiiMatch]:
    """Structured PII spans, non-overlapping, in text order. Detectors run most-specific first."""
    if not text or not _QUICK.search(text):
        return []
    out: list[PiiMatch] = []
    _emails(text, out)
    if _DIGIT.search(text):
        _ibans(text, out)
        _cards(text, out)
        _ssns(text, out)
        _ips(text, out)
        _phones(text, out, region)
    elif ":" in text:
        _ips(text, out)
    out.sort(key=lambda m: m.start)
    return out


# ---------------------------------------------------------------------------------------------------- names
# Words never taken for a name, whatever a name list says (lower case).
_NOT_NAMES = frozenset("""
i me my mine we us our you your he him his she her they them their it its the a an this that these those there here
all everyone everybody anyone someone team teams support service services customer customers care client clients
sir madam mam maam friend friends folks guys colleague colleagues manager management admin administrator agent
agents staff department dept desk help helpdesk billing sales accounts account bank company shop store office
please thanks thank regards best kind kindest warm warmest cheers hello hi hey dear good morning afternoon evening
again so very much for and or but not no yes ok okay sure also just only still anyway sorry can could would will
may might must shall should do does did is are was were am be been have has had get got let what when where why
how who which urgent re fw fwd subject note ps update order ticket case add true general early link long more soon
too back clear close date day each fee must white black green brown west north east south park page price
""".split())
# Given names that are also ordinary English words: a name only when punctuation, a line end or a family name
# follows ("Thanks, Will." yes; "Thanks, Will do" no; "Hi, May I ask" no).
_AMBIGUOUS = frozenset("""
will may mark bill hope june april august grant chase art sunday love joy grace faith summer max frank rich sue pat
rob guy ray rose lily ivy holly jack dawn sky storm pearl ruby amber crystal violet hunter penny sterling rocky
young can sunny don gene major king prince earl duke lane bay brook river forest autumn winter spring sage jade
angel star honey cash chance miles rusty dash ace buck colt patience mercy harmony melody destiny trinity justice
liberty unique precious ocean rain raven robin wren drew reed wade dean glen dale cliff clay stone ford paris jordan
lucky hall case price link christian dominic august march january july october november december monday tuesday
wednesday thursday friday saturday sunday nick sharon carol eve norm bud woody randy sandy misty
""".split())
_WORD = r"[^\W\d_]+(?:['’\-][^\W\d_]+)*"
_TOKEN = re.compile(_WORD)
_SIGNOFF = (r"(?:kind(?:est)?|best|warm(?:est)?|many)\s+(?:regards|wishes|thanks)|thanks\s+(?:again|so\s+much|a\s+lot)"
            r"|thank\s+you(?:\s+(?:so\s+much|again|very\s+much))?|regards|thanks|thx|cheers|sincerely"
            r"|yours\s+(?:sincerely|truly|faithfully)|respectfully|all\s+the\s+best|take\s+care|talk\s+soon|rgds"
            r"|(?P<weak>best|yours|love|warmly)")
_GREETING = r"hi|hello|hey|hiya|dear|greetings|good\s+(?:morning|afternoon|evening)"
_INTRO_KNOWN = r"this\s+is|i['’]?m|i\s+am"
_INTRO_ANY = r"my\s+name\s+is|my\s+name['’]s|call\s+me|name\s*:"
_CONTEXT = re.compile(
    rf"(?i)(?<![\w'’])(?:(?P<signoff>{_SIGNOFF})|(?P<greeting>{_GREETING})|(?P<known>{_INTRO_KNOWN})"
    rf"|(?P<any>{_INTRO_ANY}))(?P<sep>[ \t]*[,:!\-–—]?[ \t]*(?:\r?\n[ \t]*)?)"
    r"|(?<![\w.])(?P<title>Mr|Mrs|Ms|Mx|Miss|Dr|Prof)\.?(?P<tsep>[ \t]+)")
_AFTER_OK = re.compile(r"[ \t]*(?:$|\r?\n|[,.!?;:)\]}\"'’—–]|[ \t]-[ \t])")
_INITIAL = re.compile(r"[^\W\d_]\.")


@lru_cache(maxsize=1)
def name_lists() -> tuple[frozenset, frozenset]:
    """(given names, family names), lower case, from Faker's person providers (every locale it ships).

    Given names exclude `_NOT_NAMES`; family names keep them ("Michael Brown"), and a family name is taken on its own
    only where `_NOT_NAMES` does not hold it."""
    import faker.providers.person as person

    given: set[str] = set()
    family: set[str] = set()
    for mod in pkgutil.iter_modules(person.__path__):
        provider = getattr(importlib.import_module(f"{person.__name__}.{mod.name}"), "Provider", None)
        for attr in dir(provider):
            want = (given if attr.startswith(("first_name", "first_romanized_name")) else
                    family if attr.startswith(("last_name", "last_romanized_name")) else None)
            values = getattr(provider, attr, None) if want is not None else None
            if isinstance(values, (tuple, list, dict)):
                for v in values:
                    for w in str(v).split():
                        if len(w) > 1 and w[0].isalpha() and w[0].isupper():
                            want.add(w.casefold())
    return frozenset(given - _NOT_NAMES), frozenset(family)


_NOT_NAMES = _NOT_NAMES - _AMBIGUOUS  # "Thanks, Will." is a name; _name_at decides by what follows


def _capitalised(w: str) -> bool:
    return w[0].isupper() and not (len(w) > 1 and w.isupper())


def _name_at(text: str, pos: int, kind: str) -> Optional[tuple[int, int]]:
    """The span of a name starting at `pos` (a first word, then up to two family-name words or initials), or None.

    kind: "known" (a given name), "greet" (a given or family name), "any" (any capitalised word)."""
    m = _TOKEN.match(text, pos)
    if not m:
        return None
    w = m.group()
    low = w.casefold()
    if low in _NOT_NAMES or not _capitalised(w):
        return None
    given, family = name_lists()
    strict = low in _AMBIGUOUS
    if kind != "any":
        if low in given:
            pass
        elif kind == "greet" and low in family and low not in _NOT_NAMES:
            strict = True
        else:
            return None
    end = m.end()
    for _ in range(2):  # family name(s) or initials on the same line
        sp = re.match(r"[ \t]+", text[end:end + 4])
        if not sp:
            break
        nxt = end + sp.end()
        ini = _INITIAL.match(text, nxt)
        t = _TOKEN.match(text, nxt)
        if ini and text[nxt].isupper() and (t is None or t.end() == nxt + 1):
            end = ini.end()
            continue
        low2 = t.group().casefold() if t else ""
        if t and _capitalised(t.group()) and (low2 in family or (low2 not in _NOT_NAMES and low2 not in _AMBIGUOUS)):
            end = t.end()
            strict = False  # "Will Smith": a family name makes the first word a name
            continue
        break
    if strict and not _AFTER_OK.match(text, end):
        return None
    return m.start(), end


def find_names(text: str) -> list[PiiMatch]:
    """Personal names in sign-offs, salutations, introductions and after titles (see the module docstring)."""
    out: list[PiiMatch] = []
    for m in _CONTEXT.finditer(text):
        if m.group("title"):
            kind, pos = "any", m.end("tsep")
        else:
            sep = m.group("sep")
            if m.group("signoff") is not None:
                if m.group("weak") is not None and not any(c in sep for c in ",\n"):
                    continue
                kind = "greet"
            elif m.group("greeting") is not None:
                kind = "greet"
            else:
                kind = "known" if m.group("known") is not None else "any"
            if not sep:
                continue
            if m.group("greeting") is not None and "!" in sep and "\n" not in sep:
                continue
            pos = m.end()
        while True:
            span = _name_at(text, pos, kind)
            if span is None:
                break
            if not _overlaps(out, *span):
                out.append(PiiMatch("PERSON", span[0], span[1], text[span[0]:span[1]]))
            # "Hi John and Mary," / "Thanks, Anna & Ben": more names of the same greeting
            more = re.match(r"(?:[ \t]*,[ \t]*|[ \t]+(?:and|&)[ \t]+)", text[span[1]:span[1] + 8])
            if not more or kind == "any":
                break
            pos = span[1] + more.end()
    out.sort(key=lambda m: m.start)
    return out


# ---------------------------------------------------------------------------------------------------- engines
# spaCy English pipelines Presidio can use, best first; any other installed "en_core_web*" package comes after.
SPACY_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_trf", "en_core_web_sm")


def installed_spacy_model(preferred: Optional[str] = None) -> Optional[str]:
    """The spaCy English pipeline to hand Presidio: `preferred` when installed, else the best installed one."""
    import spacy.util

    installed = set(spacy.util.get_installed_models())
    if preferred:
        return preferred if preferred in installed or spacy.util.is_package(preferred) else None
    ranked = [m for m in SPACY_MODELS if m in installed]
    ranked += sorted(m for m in installed if m.startswith("en_core_web") and m not in SPACY_MODELS)
    return ranked[0] if ranked else None


class PresidioNER:
    """Names and locations through Presidio's AnalyzerEngine on an installed spaCy English pipeline.

    Presidio's own default downloads `en_core_web_lg` at first use; gemtune never downloads: it uses the best
    installed pipeline and says what to install when there is none. The pipeline is `model` (`data.pii_spacy_model`)
    when given, else $GEMTUNE_SPACY_MODEL when set, else the best installed English one.
    """

    def __init__(self, language: str = "en", model: Optional[str] = None):
        import os

        try:
            from presidio_analyzer import AnalyzerEngine
            from presidio_analyzer.nlp_engine import NlpEngineProvider
        except ImportError:
            raise UserError(
                "--pii-engine presidio needs Presidio: pip install 'gemtune[presidio]' and a spaCy model "
                "(python -m spacy download en_core_web_lg)", field="pii_engine") from None
        want = model or os.environ.get("GEMTUNE_SPACY_MODEL") or None
        name = installed_spacy_model(want)
        if name is None:
            raise UserError(
                (f"spaCy pipeline {want!r} is not installed" if want else "no spaCy English pipeline is installed")
                + " for --pii-engine presidio: python -m spacy download en_core_web_lg (or pip install the "
                "pipeline package; data.pii_spacy_model or GEMTUNE_SPACY_MODEL picks one)",
                field="pii_spacy_model" if model else "pii_engine")
        try:
            nlp = NlpEngineProvider(nlp_configuration={
                "nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": name}]}).create_engine()
            self.engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=[language])
        except Exception as e:  # a broken pipeline package and similar setup problems
            raise UserError(f"Presidio could not start with spaCy pipeline {name!r}: {e}", field="pii_engine") from None
        self.language, self.model = language, name

    def find(self, text: str) -> list[PiiMatch]:
        res = self.engine.analyze(text=text, entities=list(NER_TYPES), language=self.language)
        return [PiiMatch(r.entity_type, r.start, r.end, text[r.start:r.end]) for r in res]


class Redactor:
    """Finds and replaces PII; holds the optional NER engine so it is started once per build."""

    def __init__(self, engine: str = "builtin", region: str = "US", *, names: bool = True,
                 spacy_model: Optional[str] = None):
        """`names`: the builtin names pass (data.pii_names); `spacy_model`: the pipeline Presidio runs on
        (data.pii_spacy_model; default $GEMTUNE_SPACY_MODEL, else the best installed)."""
        if engine not in ("builtin", "presidio"):
            raise UserError(f"unknown PII engine {engine!r}; expected builtin or presidio", field="pii_engine")
        self.region = region.upper()
        self.names = names
        self.ner = PresidioNER(model=spacy_model) if engine == "presidio" else None

    def find(self, text: str) -> list[PiiMatch]:
        found = find_structured(text, self.region)
        if text and self.names:
            added = [m for m in find_names(text) if not _overlaps(found, m.start, m.end)]
            if added:
                found = sorted(found + added, key=lambda m: m.start)
        if self.ner is not None and text:
            for m in self.ner.find(text):
                if not _overlaps(found, m.start, m.end):
                    found.append(m)
            found.sort(key=lambda m: m.start)
        return found

    def redact(self, text: str, counts: Optional[dict[str, int]] = None) -> tuple[str, dict[str, int]]:
        counts = {} if counts is None else counts
        found = self.find(text)
        if not found:
            return text, counts
        parts, pos = [], 0
        for m in found:
            parts.append(text[pos:m.start])
            parts.append(placeholder(m.type))
            pos = m.end
            counts[m.type] = counts.get(m.type, 0) + 1
        parts.append(text[pos:])
        return "".join(parts), counts


_default: dict[tuple[str, str], Redactor] = {}


def _redactor(engine: str, region: str) -> Redactor:
    key = (engine, region)
    if key not in _default:
        _default[key] = Redactor(engine, region)
    return _default[key]


def find_pii(text: str, *, engine: str = "builtin", region: str = "US") -> list[tuple[str, int, int, str]]:
    """[(type, start, end, value)] of every PII value in `text`, in order, non-overlapping."""
    return [tuple(m) for m in _redactor(engine, region).find(text)]


def redact(text: str, *, engine: str = "builtin", region: str = "US") -> tuple[str, dict[str, int]]:
    """`text` with each PII value replaced by `<TYPE>`, and how many of each type were replaced."""
    return _redactor(engine, region).redact(text)
