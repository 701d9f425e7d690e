"""Synthetic freight messages -> one JSON object each: the extraction example's data (deterministic, seeded).

    python make_data.py [--rows 2200] [--seed 15] [--out shipments.jsonl] [--schema schema.json]

Each row is {"id", "task": "extract", "instruction", "input", "output"}: `input` is an email, a chat message, a
carrier notice or a booking form about one shipment; `output` is the JSON answer (keys in schema order, compact
enough to keep sequences short on a CPU). The fields are the ones a freight desk keys in:

  shipment_id   reference such as "SHP-48213" (never long digit runs: PII redaction must not take it for a phone)
  origin        pickup city           destination   delivery city
  pickup_date   YYYY-MM-DD or null    weight        {"value": number, "unit": "kg" | "lb" | "t"} or null
  incoterm      EXW FCA FOB CFR CIF DAP DDP, or null when the message names none
  hazardous     true when the message declares dangerous goods (UN number, class, "DG", "hazmat"), else false
  priority      "standard" | "express" | "urgent" (standard unless the message asks for speed)

Contact names, phone numbers and e-mail addresses appear as noise only (sign-offs, "call me on ..."): `data build`
redacts them, and no field depends on them, so redaction never destroys an answer. Phrasing varies by channel,
field order, synonym, number and date format, case, abbreviations, typos and distractors (a second city that is
neither end, a reference that is not the shipment id), so no two messages share a template's wording closely
enough to be near-duplicates.
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import date, timedelta
from pathlib import Path

INSTRUCTION = "Extract the shipment details from this message as JSON."
INCOTERMS = ["EXW", "FCA", "FOB", "CFR", "CIF", "DAP", "DDP"]
PRIORITIES = ["standard", "express", "urgent"]
UNITS = ["kg", "lb", "t"]

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Shipment",
    "type": "object",
    "additionalProperties": False,
    "required": ["shipment_id", "origin", "destination", "pickup_date", "weight", "incoterm", "hazardous", "priority"],
    "properties": {
        "shipment_id": {"type": "string", "pattern": "^[A-Z]{2,4}-[0-9]{4,6}$"},
        "origin": {"type": "string", "minLength": 2},
        "destination": {"type": "string", "minLength": 2},
        "pickup_date": {"anyOf": [{"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}, {"type": "null"}]},
        "weight": {"anyOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False, "required": ["value", "unit"],
            "properties": {"value": {"type": "number", "exclusiveMinimum": 0}, "unit": {"enum": UNITS}}}]},
        "incoterm": {"enum": INCOTERMS + [None]},
        "hazardous": {"type": "boolean"},
        "priority": {"enum": PRIORITIES},
    },
}

# Cities that are not also common given names (PII name rules look at words after "Hi", "Regards," ...).
CITIES = [
    "Rotterdam", "Hamburg", "Antwerp", "Felixstowe", "Le Havre", "Valencia", "Barcelona", "Genoa", "Piraeus",
    "Gdansk", "Gothenburg", "Aarhus", "Bremen", "Duisburg", "Lyon", "Milan", "Munich", "Prague", "Vienna",
    "Budapest", "Warsaw", "Madrid", "Lisbon", "Porto", "Zurich", "Basel", "Brussels", "Lille", "Leeds",
    "Manchester", "Glasgow", "Dublin", "Chicago", "Memphis", "Dallas", "Atlanta", "Newark", "Seattle",
    "Oakland", "Long Beach", "Savannah", "Toronto", "Montreal", "Monterrey", "Shanghai", "Ningbo", "Shenzhen",
    "Busan", "Yokohama", "Singapore", "Port Klang", "Mumbai", "Chennai", "Dubai", "Jeddah", "Durban",
    "Mombasa", "Santos", "Callao", "Melbourne", "Auckland", "Istanbul", "Tallinn", "Riga", "Bratislava",
]
OFFICE_CITIES = ["Oslo", "Helsinki", "Copenhagen", "Stuttgart", "Cologne", "Turin", "Seville", "Krakow"]
PREFIXES = ["SHP", "FRT", "LD", "BKG", "CN", "TRK", "MOV", "ORD"]
CONTACTS = ["Priya Raman", "Tomasz Nowak", "Ana Ribeiro", "Kenji Sato", "Leila Haddad", "Marco Bianchi",
            "Grace Okafor", "Lars Nilsson", "Sofia Alves", "Daniel Cohen", "Mei Lin", "Omar Farouk",
            "Hannah Becker", "Luis Moreno", "Aisha Bello", "Pieter de Vries"]
COMPANIES = ["Nordlane Logistics", "BlueHarbor Freight", "Transcontinental Movers", "Atlas Cargo", "Kestrel Haulage",
             "Meridian Forwarding", "Polar Express Lines", "Ironbridge Supply", "Solano Trading", "Vantage 3PL"]
GOODS = ["machine parts", "auto spares", "textiles", "frozen fish", "furniture", "solar panels", "coffee beans",
         "electronics", "paper rolls", "steel coils", "medical devices", "toys", "wine", "plastic pellets",
         "ceramic tiles", "bicycles", "printer cartridges", "garden tools"]
HAZ_GOODS = [("lithium batteries", "UN3480", "9"), ("paint", "UN1263", "3"), ("aerosols", "UN1950", "2.1"),
             ("sodium hydroxide solution", "UN1824", "8"), ("ethanol", "UN1170", "3"),
             ("compressed oxygen", "UN1072", "2.2"), ("perfume products", "UN1266", "3"),
             ("corrosive cleaning liquid", "UN1760", "8")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def maybe(rng: random.Random, p: float) -> bool:
    return rng.random() < p


def draw_answer(rng: random.Random) -> dict:
    origin, dest = rng.sample(CITIES, 2)
    unit = rng.choices(UNITS, weights=[6, 2, 2])[0]
    if unit == "t":
        value = round(rng.uniform(1, 24), 1) if maybe(rng, 0.6) else rng.randint(2, 26)
    elif unit == "lb":
        value = rng.randrange(200, 44000, 10)
    else:
        value = rng.choice([rng.randrange(40, 24000, 5), round(rng.uniform(5, 900), 1)])
    value = int(value) if float(value).is_integer() else value
    day = date(2025, 1, 1) + timedelta(days=rng.randrange(0, 500))
    return {
        "shipment_id": f"{rng.choice(PREFIXES)}-{rng.randrange(1000, 999999) if maybe(rng, 0.4) else rng.randrange(1000, 99999)}",
        "origin": origin,
        "destination": dest,
        "pickup_date": day.isoformat() if maybe(rng, 0.85) else None,
        "weight": {"value": value, "unit": unit} if maybe(rng, 0.88) else None,
        "incoterm": rng.choice(INCOTERMS) if maybe(rng, 0.6) else None,
        "hazardous": maybe(rng, 0.25),
        "priority": rng.choices(PRIORITIES, weights=[5, 3, 2])[0],
    }


# ------------------------------------------------------------------------------------------ how a value is written

def say_date(rng: random.Random, iso: str) -> str:
    d = date.fromisoformat(iso)
    m = MONTHS[d.month - 1]
    return rng.choice([
        iso, f"{d.day} {m} {d.year}", f"{m} {d.day}, {d.year}", f"{d.day:02d}.{d.month:02d}.{d.year}",
        f"{d.day} {m[:3]} {d.year}", f"{m[:3]} {d.day} {d.year}", f"{d.year}/{d.month:02d}/{d.day:02d}",
        f"{['Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'][d.weekday()]} {d.day} {m} {d.year}",
    ])


def say_number(rng: random.Random, v) -> str:
    if isinstance(v, float):
        return str(v)
    if v >= 1000 and maybe(rng, 0.5):
        return f"{v:,}"
    return str(v)


def say_weight(rng: random.Random, w: dict) -> str:
    n = say_number(rng, w["value"])
    unit = {"kg": ["kg", "kgs", "KG", " kg", " kilos", " kilograms"],
            "lb": ["lbs", " lbs", " lb", " pounds", "LBS"],
            "t": [" t", " tonnes", " tons", "MT", " metric tons", "t"]}[w["unit"]]
    return n + rng.choice(unit)


def say_priority(rng: random.Random, p: str) -> str:
    return rng.choice({
        "standard": ["", "", "standard service is fine", "no rush on this one", "normal transit time is ok",
                     "economy service please", "regular lead time"],
        "express": ["express service please", "please book it as express", "expedited transit needed",
                    "we need the express option", "priority service (express)", "go express on this"],
        "urgent": ["URGENT", "this is urgent", "hot shipment, needs to move asap", "critical - line down at "
                   "the customer", "urgent: must go today", "ASAP please, very urgent"],
    }[p])


def say_hazard(rng: random.Random, haz: bool, goods: str, un: tuple) -> str:
    if haz:
        name, code, cls = un
        return rng.choice([f"contains {name} ({code}, class {cls})", f"DG cargo: {name}, {code}",
                           f"hazmat - {name}, class {cls}", f"dangerous goods on board ({code} {name})",
                           f"{name}, IMO class {cls}, {code}", f"please note DGR applies: {code}"])
    return rng.choice(["", "", "", f"non-hazardous {goods}", "no dangerous goods", "not DG", f"general cargo ({goods})",
                       "non-haz", "hazmat: no"])


def typo(rng: random.Random, text: str) -> str:
    """One swapped letter pair in a word that carries no value (values are never corrupted)."""
    words = text.split(" ")
    safe = [i for i, w in enumerate(words) if w.isalpha() and w.islower() and len(w) > 4]
    if not safe:
        return text
    i = rng.choice(safe)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


# ------------------------------------------------------------------------------------------ message channels

def _parts(rng: random.Random, a: dict, goods: str, un: tuple) -> dict:
    ref = a["shipment_id"]
    lane = rng.choice([
        f"from {a['origin']} to {a['destination']}", f"{a['origin']} -> {a['destination']}",
        f"ex {a['origin']}, delivering to {a['destination']}", f"{a['origin']} to {a['destination']}",
        f"pickup in {a['origin']}, drop in {a['destination']}", f"origin {a['origin']}, destination {a['destination']}",
        f"collect at {a['origin']} and deliver to {a['destination']}", f"lane {a['origin']} - {a['destination']}",
    ])
    return {
        "ref": rng.choice([f"ref {ref}", f"shipment {ref}", f"our ref: {ref}", f"booking {ref}", f"{ref}",
                           f"shipment no. {ref}", f"reference {ref}"]),
        "lane": lane,
        "date": "" if a["pickup_date"] is None else rng.choice(["pickup ", "ready for collection ", "collection on ",
                                                                 "cargo ready ", "pick up ", "loading "])
        + say_date(rng, a["pickup_date"]),
        "weight": "" if a["weight"] is None else rng.choice(["gross weight ", "weight ", "approx. ", "total ", "wt ", ""])
        + say_weight(rng, a["weight"]),
        "incoterm": "" if a["incoterm"] is None else rng.choice([f"terms {a['incoterm']}", f"Incoterm: {a['incoterm']}",
                                                                 f"{a['incoterm']} {a['origin']}", f"sold {a['incoterm']}",
                                                                 f"on {a['incoterm']} terms"]),
        "hazard": say_hazard(rng, a["hazardous"], goods, un),
        "priority": say_priority(rng, a["priority"]),
        "goods": rng.choice([f"{goods}", f"{rng.randint(1, 30)} pallets of {goods}", f"a 40ft container of {goods}",
                             f"{rng.randint(2, 60)} cartons ({goods})", f"LCL {goods}"]),
    }


def sign_off(rng: random.Random) -> str:
    name = rng.choice(CONTACTS)
    first = name.split()[0]
    phone = f"+{rng.choice(['1', '44', '49', '31', '33'])} {rng.randint(200, 899)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    return rng.choice([
        f"\n\nThanks,\n{first}", f"\n\nRegards,\n{name}\n{rng.choice(COMPANIES)}", f"\n\nBest regards,\n{name}\nTel {phone}",
        f"\n\nCheers, {first}", f"\n-- {name} | {rng.choice(COMPANIES)}", "", f"\nCall me on {phone} if anything is unclear.",
        f"\n\nKind regards\n{name}",
    ])


def distractor(rng: random.Random, a: dict) -> str:
    return rng.choice([
        f"Invoice goes to our {rng.choice(OFFICE_CITIES)} office.",
        f"PO {rng.randrange(10000, 99999)} for your records.",
        f"Last month's load to {rng.choice(OFFICE_CITIES)} went fine, thanks.",
        f"Customs broker is in {rng.choice(OFFICE_CITIES)}.",
        f"Quote Q{rng.randrange(1000, 9999)} attached.",
    ])


def email(rng: random.Random, a: dict, p: dict) -> str:
    greet = rng.choice(["Hi team,", "Hello,", "Good morning,", "Dear partners,", "Hi all,", "Hey,", "Dear Sir/Madam,"])
    sentences = [f"Please arrange transport {p['lane']} for {p['goods']}.", f"Our {p['ref']}." if maybe(rng, 0.5)
                 else f"Please quote {p['ref']} on all documents."]
    for key, wraps in (("date", ["{}.", "Shipper confirms {}.", "Timing: {}."]),
                       ("weight", ["{}.", "Weight info: {}.", "Paperwork says {}."]),
                       ("incoterm", ["{}.", "Shipping {}.", "Trade terms: {}."]),
                       ("hazard", ["{}.", "Note: {}.", "FYI {}."]),
                       ("priority", ["{}.", "{}, thank you.", "Service: {}."])):
        if p[key]:
            s = rng.choice(wraps).format(p[key])
            sentences.append(s[0].upper() + s[1:])
    head, rest = sentences[:1], sentences[1:]
    rng.shuffle(rest)
    if maybe(rng, 0.25):
        rest.insert(rng.randrange(len(rest) + 1), distractor(rng, a))
    subject = f"Subject: {rng.choice(['Booking request', 'New shipment', 'Transport request', 'Pickup', 'RE: rates'])} {a['shipment_id'] if maybe(rng, 0.4) else ''}".rstrip()
    body = " ".join(head + rest)
    return (subject + "\n\n" if maybe(rng, 0.5) else "") + greet + "\n" + body + sign_off(rng)


def chat(rng: random.Random, a: dict, p: dict) -> str:
    bits = [p["ref"], p["lane"]] + [p[k] for k in ("date", "weight", "incoterm", "hazard", "priority") if p[k]]
    first, rest = bits[:2], bits[2:]
    rng.shuffle(rest)
    rng.shuffle(first)
    sep = rng.choice([", ", " / ", "; ", " - ", ". "])
    text = sep.join(first + rest)
    text = text.lower() if maybe(rng, 0.4) else text
    text = text.replace(a["shipment_id"].lower(), a["shipment_id"])
    for city in (a["origin"], a["destination"]):
        text = text.replace(city.lower(), city)
    opener = rng.choice(["", "hey ", "quick one: ", "new load: ", "pls book ", "can you move this? ", "fyi "])
    return opener + text + rng.choice(["", " thx", " ty", "!", " pls", " cheers"])


def notice(rng: random.Random, a: dict, p: dict) -> str:
    title = rng.choice(["CARRIER NOTICE", "BOOKING CONFIRMATION", "Pickup advice", "TRANSPORT ORDER", "Load tender",
                        "Shipping instruction"])
    lbl = {
        "ref": rng.choice(["Shipment", "Ref", "Our reference", "Booking no.", "Consignment"]),
        "origin": rng.choice(["From", "Origin", "Pickup", "Ship from", "POL"]),
        "destination": rng.choice(["To", "Destination", "Delivery", "Ship to", "POD"]),
        "date": rng.choice(["Pickup date", "Ready date", "Collection", "ETD", "Loading date"]),
        "weight": rng.choice(["Gross weight", "Weight", "G.W.", "Total weight", "Chargeable wt"]),
        "incoterm": rng.choice(["Incoterm", "Terms", "Incoterms 2020", "Delivery terms"]),
    }
    rows = [(lbl["ref"], a["shipment_id"]), (lbl["origin"], a["origin"]), (lbl["destination"], a["destination"])]
    if a["pickup_date"]:
        rows.append((lbl["date"], say_date(rng, a["pickup_date"])))
    if a["weight"]:
        rows.append((lbl["weight"], say_weight(rng, a["weight"])))
    if a["incoterm"]:
        rows.append((lbl["incoterm"], a["incoterm"]))
    rows.append(("Commodity", p["goods"]))
    if a["hazardous"] or maybe(rng, 0.5):
        rows.append((rng.choice(["DG", "Hazardous", "Dangerous goods"]), p["hazard"] or "no"))
    if a["priority"] != "standard" or maybe(rng, 0.4):
        rows.append((rng.choice(["Service", "Priority", "Service level"]),
                     {"standard": rng.choice(["standard", "economy", "normal"]),
                      "express": rng.choice(["express", "expedited"]),
                      "urgent": rng.choice(["URGENT", "urgent / hot", "critical"])}[a["priority"]]))
    head, tail = rows[:1], rows[1:]
    if maybe(rng, 0.5):
        rng.shuffle(tail)
    colon = rng.choice([": ", " : ", ":  ", " = "])
    lines = [f"{k}{colon}{v}" for k, v in head + tail]
    bullet = rng.choice(["", "- ", "* ", "  "])
    return f"{title}\n" + "\n".join(bullet + ln for ln in lines) + rng.choice(["", "\nPlease confirm.", sign_off(rng)])


def compose(rng: random.Random, a: dict) -> str:
    goods = rng.choice(GOODS)
    un = rng.choice(HAZ_GOODS)
    p = _parts(rng, a, un[0] if a["hazardous"] else goods, un)
    channel = rng.choices([email, chat, notice], weights=[4, 3, 3])[0]
    text = channel(rng, a, p)
    if maybe(rng, 0.15):
        text = typo(rng, text)
    return text.strip()


def answer_text(a: dict) -> str:
    return json.dumps(a, ensure_ascii=False)


def make_rows(n: int = 2200, seed: int = 15) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        a = draw_answer(rng)
        if a["shipment_id"] in seen:
            continue
        seen.add(a["shipment_id"])
        rows.append({"id": f"ship-{len(rows):05d}", "task": "extract", "instruction": INSTRUCTION,
                     "input": compose(rng, a), "output": answer_text(a)})
    return rows


def main(argv=None) -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2200)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--out", default=str(here / "shipments.jsonl"))
    ap.add_argument("--schema", default=str(here / "schema.json"))
    args = ap.parse_args(argv)
    rows = make_rows(args.rows, args.seed)
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    Path(args.schema).write_text(json.dumps(SCHEMA, indent=2) + "\n", encoding="utf-8")
    print(f"{len(rows)} rows -> {args.out}; schema -> {args.schema}")


if __name__ == "__main__":
    main()
