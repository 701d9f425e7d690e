"""PII detection and redaction: emails, phone numbers, US SSNs, payment cards, IBANs, IP addresses.

Every structured type is found by a pattern and then *validated* (phone numbers by libphonenumber, cards by Luhn
plus issuer prefix and length, IBANs by country length plus mod-97, SSNs by the SSA's never-issued ranges, IPs by
`ipaddress`), because support data is full of digit strings that are not PII: order numbers, tracking ids, dates,
prices. Those are the false positives that would otherwise shred a training set, so digit runs directly after an
order/tracking/invoice keyword are never taken for phones or cards.

`find_pii(text)` -> [(type, start, end, value)], `redact(text)` -> (text with `<TYPE>` placeholders, {TYPE: n}).
The privacy probe scans model generations with the same functions. Names and locations need a NER model:
`engine="presidio"` adds PERSON and LOCATION through Microsoft Presidio when it is installed.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import NamedTuple, Optional

import phonenumbers

from gemtune.errors import UserError

PII_TYPES = ("EMAIL", "PHONE", "SSN", "CREDIT_CARD", "IBAN", "IP_ADDRESS")
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


# ---------------------------------------------------------------------------------------------------- engines
class PresidioNER:
    """Names and locations through Presidio's AnalyzerEngine (spaCy model required by Presidio)."""

    def __init__(self, language: str = "en"):
        try:
            from presidio_analyzer import AnalyzerEngine
        except ImportError:
            raise UserError(
                "--pii-engine presidio needs Presidio: pip install 'gemtune[presidio]' and a spaCy model "
                "(python -m spacy download en_core_web_lg)", field="pii_engine") from None
        try:
            self.engine = AnalyzerEngine()
        except Exception as e:  # missing spaCy model and similar setup problems
            raise UserError(f"Presidio could not start: {e}", field="pii_engine") from None
        self.language = language

    def find(self, text: str) -> list[PiiMatch]:
        res = self.engine.analyze(text=text, entities=list(NER_TYPES), language=self.language)
        return [PiiMatch(r.entity_type, r.start, r.end, text[r.start:r.end]) for r in res]


class Redactor:
    """Finds and replaces PII; holds the optional NER engine so it is started once per build."""

    def __init__(self, engine: str = "builtin", region: str = "US"):
        if engine not in ("builtin", "presidio"):
            raise UserError(f"unknown PII engine {engine!r}; expected builtin or presidio", field="pii_engine")
        self.region = region.upper()
        self.ner = PresidioNER() if engine == "presidio" else None

    def find(self, text: str) -> list[PiiMatch]:
        found = find_structured(text, self.region)
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
