"""Generate the sample support-ticket routing project (deterministic; output committed to gemtune/demo_project).

A realistic mess on purpose: 8 queues with uneven sizes, PII in messages (emails, phones, card numbers, IBANs,
IPs), exact and near duplicates, a few malformed lines, mixed provenance — what `gemtune data build` must clean.

    python examples/support-routing/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "gemtune" / "demo_project"

QUEUES = {
    "billing": [
        "I was charged twice for my {plan} subscription this month",
        "why is there an extra fee of {price} on my latest invoice",
        "my invoice {inv} shows the wrong amount, please correct it",
        "can you send me a copy of the bill for {month}",
        "the {plan} plan price went up without notice",
        "I need a VAT invoice for order {order}",
    ],
    "refunds": [
        "I returned the {item} two weeks ago and still have no refund",
        "please refund order {order}, the {item} arrived broken",
        "how long does a refund take to reach my card",
        "I cancelled within the trial, I want my money back",
        "the refund for {order} was only partial, where is the rest",
        "you promised a refund of {price} last week",
    ],
    "card_services": [
        "my card ending {last4} was declined at the shop today",
        "I need a replacement card, mine is damaged",
        "how do I change the PIN of my card",
        "my new card has not arrived after {days} days",
        "please raise the daily limit on my card to {price}",
        "the contactless payment does not work on my card",
    ],
    "account_access": [
        "I cannot log in, it says my password is wrong",
        "I never received the two-factor code by SMS",
        "my account is locked after too many attempts",
        "how do I reset my password, the email link expired",
        "I changed phones and lost access to the authenticator app",
        "the login page keeps loading forever on {browser}",
    ],
    "fraud": [
        "there is a payment of {price} I did not make",
        "someone used my card in {city}, I am at home",
        "I got a phishing email pretending to be you, contact {email}",
        "unknown transactions appeared on my statement yesterday",
        "I think my account was hacked, the email was changed",
        "a stranger called asking for my card number {card}",
    ],
    "shipping": [
        "where is my parcel, tracking {track} has not moved",
        "the courier left my package at the wrong address",
        "can I change the delivery address for order {order}",
        "my delivery is {days} days late",
        "the box arrived damaged and open",
        "do you ship to {city}",
    ],
    "technical_support": [
        "the app crashes when I open the statements page on {browser}",
        "I get error {err} when uploading a document",
        "the website shows a blank page after the update",
        "notifications stopped working on my phone",
        "export to CSV produces an empty file",
        "the API returns {err} for every request from {ip}",
    ],
    "cancellations": [
        "please cancel my {plan} subscription at the end of the month",
        "I want to close my account and delete my data",
        "how do I stop the automatic renewal",
        "cancel order {order} before it ships",
        "I am moving abroad and want to end my contract",
        "stop my membership, I no longer use the service",
    ],
}
WEIGHTS = {"billing": 1.3, "refunds": 1.1, "card_services": 1.0, "account_access": 1.2, "fraud": 0.7,
           "shipping": 1.2, "technical_support": 1.0, "cancellations": 0.8}
OPENERS = ["", "Hi, ", "Hello team, ", "Good morning. ", "URGENT: ", "hey ", "Dear support, "]
CLOSERS = ["", " Thanks.", " Please help.", " Regards, {name}", " You can reach me at {email}.",
           " Call me on {phone}.", " My IBAN is {iban} if needed.", " Card number {card}."]
NAMES = ["Maria", "John", "Aiko", "Luis", "Fatima", "Ole", "Priya", "Chen"]
CITIES = ["Lisbon", "Berlin", "Austin", "Lagos", "Osaka", "Toronto"]
BROWSERS = ["Chrome", "Firefox", "Safari", "Edge"]
PLANS = ["Basic", "Plus", "Premium", "Business"]
ITEMS = ["headphones", "jacket", "coffee machine", "phone case", "desk lamp"]
MONTHS = ["January", "March", "June", "September", "November"]
# test card numbers that pass Luhn, and valid-checksum example IBANs
CARDS = ["4111 1111 1111 1111", "5555 5555 5555 4444", "4012 8888 8888 1881", "3782 822463 10005"]
IBANS = ["DE89 3704 0044 0532 0130 00", "GB82 WEST 1234 5698 7654 32", "FR14 2004 1010 0505 0001 3M02 606"]
PHONES = ["+1 415 555 2671", "+44 20 7946 0958", "(212) 555-0187", "+49 30 901820"]


def fill(t: str, rng: random.Random) -> str:
    return t.format(
        plan=rng.choice(PLANS), price=f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}", inv=f"INV-{rng.randint(10000, 99999)}",
        month=rng.choice(MONTHS), order=f"#{rng.randint(100000, 999999)}", item=rng.choice(ITEMS),
        last4=rng.randint(1000, 9999), days=rng.randint(3, 30), browser=rng.choice(BROWSERS), city=rng.choice(CITIES),
        email=f"{rng.choice(NAMES).lower()}.{rng.randint(1, 99)}@example.com", card=rng.choice(CARDS),
        track=f"1Z{rng.randint(10**9, 10**10 - 1)}", err=rng.choice(["E1042", "500", "403", "E77"]),
        ip=f"203.0.113.{rng.randint(1, 254)}", name=rng.choice(NAMES), phone=rng.choice(PHONES), iban=rng.choice(IBANS),
    )


def ticket(queue: str, rng: random.Random) -> str:
    body = fill(rng.choice(QUEUES[queue]), rng)
    return (rng.choice(OPENERS) + body + fill(rng.choice(CLOSERS), rng)).strip()


def main(n: int = 520, seed: int = 7) -> None:
    rng = random.Random(seed)
    names = list(QUEUES)
    weights = [WEIGHTS[q] for q in names]
    rows = []
    for i in range(n):
        q = rng.choices(names, weights)[0]
        rows.append({"id": f"t{i:04d}", "text": ticket(q, rng), "queue": q,
                     "source": rng.choice(["zendesk-export-2026-09", "email-inbox", "chat-widget"]),
                     "review_status": rng.choice(["approved", "approved", "approved", "pending"]),
                     "license": "internal"})
    # exact duplicates (re-exports) and near duplicates (same ticket, small edits)
    for r in rng.sample(rows, 18):
        rows.append({**r, "id": r["id"] + "-dup"})
    for r in rng.sample(rows[:n], 14):
        rows.append({**r, "id": r["id"] + "-near", "text": r["text"].replace(".", "!").replace(" my ", " my own ", 1) + " thx"})
    rng.shuffle(rows)
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    # malformed lines a real export has
    bad = ['{"id": "broken-1", "text": "my card was declined", "queue": ',                      # truncated JSON
           '{"id": "broken-2", "text": "", "queue": "billing"}',                                  # empty text
           '{"id": "broken-3", "text": "where is my parcel", "queue": null}',                     # missing label
           '{"id": "broken-4", "text": ["not", "a", "string"], "queue": "shipping"}',             # wrong type
           'this line is not json at all']
    for j, b in enumerate(bad):
        lines.insert(40 + 83 * j, b)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tickets.jsonl").write_text("\n".join(lines) + "\n")

    generic = [
        ("Summarise the text in one sentence.", "The meeting moved to Thursday because the venue was booked, and "
         "everyone should bring the Q3 numbers.", "The meeting is now on Thursday and attendees should bring the Q3 numbers."),
        ("Translate to French.", "Good morning, how are you?", "Bonjour, comment allez-vous ?"),
        ("Give a synonym.", "happy", "joyful"),
        ("Convert the temperature from Celsius to Fahrenheit.", "25 C", "77 F"),
        ("Correct the grammar.", "She go to school every days.", "She goes to school every day."),
        ("Classify the sentiment as positive or negative.", "The service was slow and rude.", "negative"),
        ("Write a haiku about rain.", "", "Soft rain on the roof\nthe street lamps blur into gold\nthe city exhales"),
        ("What is the capital of Japan?", "", "Tokyo"),
        ("Sort the numbers in ascending order.", "9, 2, 7, 4", "2, 4, 7, 9"),
        ("Extract the year.", "The bridge opened in 1937 after four years of work.", "1937"),
        ("Answer yes or no: is 17 a prime number?", "", "yes"),
        ("Make the sentence more formal.", "Can u send me the file asap?", "Could you please send me the file as soon as possible?"),
        ("Name the largest planet in the solar system.", "", "Jupiter"),
        ("Count the words.", "one two three four five", "5"),
        ("Rewrite in the past tense.", "I walk to work.", "I walked to work."),
        ("Give the opposite.", "cold", "hot"),
        ("What does CPU stand for?", "", "Central Processing Unit"),
        ("Add the numbers.", "12 and 30", "42"),
        ("Suggest a title for the paragraph.", "Bees pollinate a third of the crops we eat.", "Why Bees Matter"),
        ("Spell the word backwards.", "lemon", "nomel"),
        ("Is the statement true or false? Water boils at 100 C at sea level.", "", "true"),
        ("List three primary colours.", "", "red, blue, yellow"),
        ("Turn the list into a sentence.", "eggs, milk, bread", "We need eggs, milk and bread."),
        ("Give an example of a mammal that can fly.", "", "bat"),
    ]
    (OUT / "generic.jsonl").write_text("".join(
        json.dumps({"instruction": i, "input": x, "output": o, "source": "handwritten-generic", "license": "Apache-2.0"}) + "\n"
        for i, x, o in generic))
    print(f"wrote {len(lines)} ticket lines and {len(generic)} generic rows to {OUT}")


if __name__ == "__main__":
    main()
