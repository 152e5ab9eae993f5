"""Generate the support-triage dataset used by ``examples/train_qlora.py``.

Each record is a customer-support message and the triage record a help desk
would file for it, as compact JSON::

    {"category": "billing", "priority": "high", "product": "orbit_watch"}

The label set (6 categories, 3 priorities, 6 fictional products with
snake_case ids) and the rules behind it are this help desk's own, so a
pre-trained model cannot know them; the rules are consistent, so a model can
learn them from a few hundred examples:

* category: what the customer needs (billing, technical_issue, account_access,
  shipping, feature_request, cancellation);
* priority: high when the message says the customer is blocked or losing money
  right now, or reports a safety problem; low for feature requests and when the
  customer says there is no hurry; medium otherwise;
* product: the product the message is about, however it is spelled.

Messages are assembled from varied openings, bodies, urgency cues, closings,
order numbers, casing and the odd typo. Deterministic:
``python examples/data/make_support_triage.py`` rewrites the committed files
byte for byte.
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUCTION = ("Triage this support message. Reply with a JSON object with the keys "
               "category, priority and product.")

PRODUCTS = {
    "nimbus_router": ["Nimbus Router", "Nimbus router", "nimbus", "Nimbus mesh router", "NIMBUS"],
    "orbit_watch": ["Orbit Watch", "Orbit smartwatch", "orbit watch", "Orbit", "Orbit watch 2"],
    "pulse_earbuds": ["Pulse Earbuds", "Pulse buds", "pulse earbuds", "Pulse wireless earbuds", "Pulse"],
    "atlas_laptop": ["Atlas Laptop", "Atlas 14", "atlas laptop", "Atlas notebook", "Atlas"],
    "lumen_bulb": ["Lumen Smart Bulb", "Lumen bulbs", "lumen bulb", "Lumen light", "LUMEN bulb"],
    "vela_thermostat": ["Vela Thermostat", "Vela", "vela thermostat", "Vela smart thermostat", "Vela thermo"],
}

# {p}: product mention, {o}: order number, {d}: a date-ish phrase, {n}: a number
BODIES = {
    "billing": [
        "I was charged twice for my {p} order {o}. Please fix the extra charge.",
        "My invoice for the {p} shows ${n} but the price on your site was lower.",
        "Why did my card get billed again this month for the {p} subscription?",
        "The {p} protection plan renewed {d} and I never agreed to auto-renew. I want that charge reviewed.",
        "Can you send me a corrected receipt for the {p}? The VAT number on it is wrong.",
        "There is a charge of ${n} on my statement for {p} that I do not recognise.",
        "My promo code was not applied when I bought the {p}, so I paid full price.",
    ],
    "technical_issue": [
        "My {p} keeps disconnecting every few minutes since the last update.",
        "The {p} will not turn on anymore, even after charging it overnight.",
        "After the firmware update {d} my {p} is stuck on the boot screen.",
        "The app cannot find my {p} when I try to pair it.",
        "My {p} restarts by itself several times a day.",
        "The battery on my {p} drains in about {n} hours, it used to last days.",
        "The {p} gets really hot and I noticed a burning smell.",
        "Sound on the {p} crackles and cuts out on the left side.",
    ],
    "account_access": [
        "I cannot log in to the app that controls my {p}; it says my password is wrong.",
        "I never receive the verification code, so I am locked out of my account and my {p}.",
        "Someone changed the email on my account. I think it was hacked. I use it for my {p}.",
        "The two-factor reset link for my {p} account has expired, can you send a new one?",
        "My account got locked after too many attempts and now I cannot manage my {p}.",
        "I want to transfer my {p} to my partner's account but the app will not let me.",
    ],
    "shipping": [
        "My {p} order {o} still has not arrived and tracking has not moved since {d}.",
        "The {p} was delivered to the wrong address. Order {o}.",
        "The box for my {p} arrived crushed and the device is scratched.",
        "Tracking for order {o} says delivered but there is no {p} at my door.",
        "Can I change the delivery address for my {p} order {o}? It has not shipped yet.",
        "I ordered {n} units of the {p} but only received one.",
    ],
    "feature_request": [
        "It would be great if the {p} supported dark mode in the app.",
        "Please add an option to schedule the {p} by day of the week.",
        "Could the {p} export its data to a spreadsheet?",
        "I would love a widget for the {p} on my phone's home screen.",
        "Any plans to let the {p} work with voice assistants?",
        "Suggestion: let us rename devices like the {p} from the main screen.",
    ],
    "cancellation": [
        "Please cancel my {p} subscription, I no longer need it.",
        "I want to cancel order {o} for the {p} before it ships.",
        "How do I close my account and stop the {p} plan from renewing?",
        "Cancel the {p} premium plan at the end of this billing period please.",
        "I returned the {p} already, so please cancel the remaining installments.",
    ],
}

# Bodies that are high priority whatever else the message says (safety, fraud, money lost twice).
ALWAYS_HIGH = {
    "The {p} gets really hot and I noticed a burning smell.",
    "Someone changed the email on my account. I think it was hacked. I use it for my {p}.",
    "I was charged twice for my {p} order {o}. Please fix the extra charge.",
}

URGENT = [
    "This is urgent, our whole office depends on it.",
    "I need this fixed today, my business is losing sales.",
    "URGENT: I cannot work at all until this is solved.",
    "Please treat this as an emergency.",
    "I have a client demo in two hours and nothing works.",
    "This is blocking me completely.",
]
RELAXED = [
    "No rush at all.",
    "Whenever you get a chance.",
    "Not urgent, just curious.",
    "Take your time.",
]
OPENINGS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "Hi support team,", "Dear support,", "", "", "Hello team,"]
CLOSINGS = ["Thanks,", "Thank you!", "Regards,", "Cheers,", "Best,", "", "Thanks in advance."]
NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lucas", "Priya", "Olga", "Sam", "Fatima", "Diego", "Nora", "Ben"]
DATES = ["yesterday", "last week", "on Monday", "two days ago", "on the 3rd", "this morning"]
TYPOS = {"receive": "recieve", "cannot": "cant", "address": "adress", "please": "pls", "the ": "teh "}


def _message(rng: random.Random) -> tuple[str, dict]:
    category = rng.choice(sorted(BODIES))
    body = rng.choice(BODIES[category])
    product = rng.choice(sorted(PRODUCTS))
    text = body.format(p=rng.choice(PRODUCTS[product]), o=f"#{rng.randint(10000, 99999)}",
                       d=rng.choice(DATES), n=rng.randint(2, 400))
    cue = rng.random()
    if body in ALWAYS_HIGH:
        priority = "high"
        if cue < 0.3:
            text += " " + rng.choice(URGENT)
    elif category == "feature_request":
        priority = "low"
        if cue < 0.3:
            text += " " + rng.choice(RELAXED)
    elif cue < 0.35:
        priority = "high"
        text += " " + rng.choice(URGENT)
    elif cue < 0.55:
        priority = "low"
        text += " " + rng.choice(RELAXED)
    else:
        priority = "medium"
    if rng.random() < 0.15:
        word = rng.choice(sorted(TYPOS))
        text = text.replace(word, TYPOS[word], 1)
    if rng.random() < 0.1:
        text = text.lower()
    opening, closing = rng.choice(OPENINGS), rng.choice(CLOSINGS)
    signature = f"\n{closing}\n{rng.choice(NAMES)}" if closing else ""
    message = (f"{opening}\n" if opening else "") + text + signature
    return message, {"category": category, "priority": priority, "product": product}


def _record(message: str, label: dict) -> dict:
    return {"instruction": INSTRUCTION, "input": message,
            "output": json.dumps(label, separators=(", ", ": "))}


def generate(n_train: int = 400, n_test: int = 60, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Return (train, test) records with no message shared between them."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_test:
        message, label = _message(rng)
        if message in seen:
            continue
        seen.add(message)
        rows.append(_record(message, label))
    return rows[:n_train], rows[n_train:]


def main() -> None:
    train, test = generate()
    for name, rows in (("support_triage_train.jsonl", train), ("support_triage_test.jsonl", test)):
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {os.path.join(HERE, name)}")


if __name__ == "__main__":
    main()
