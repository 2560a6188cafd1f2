"""A labelled retrieval set for search by meaning (issue 21): 30 short passages on distinct topics, each with two
paraphrased queries that share no content word with it, and one keyword query taken from its own words.

``check()`` enforces the "no shared content word" rule (lower-cased words, a small stop-word list), so an edit
that lets a paraphrase lean on the passage's own words fails loudly.
"""

from __future__ import annotations

import re

# (passage, [paraphrase, paraphrase], keyword query)
PASSAGES: list[tuple[str, list[str], str]] = [
    ("The harbour crossing is shut for repairs until next week.",
     ["when does the bridge reopen after maintenance", "closing of the port link for fixing works"],
     "harbour crossing"),
    ("Buses will run every ten minutes from the central station.",
     ["how often do coaches leave the main depot", "frequent transit service from downtown terminal"], "buses station"),
    ("Heavy rain is expected across the northern valleys tonight.",
     ["storm forecast for the hills up north this evening", "downpour warning overnight in mountain regions"],
     "rain valleys"),
    ("The museum opens a new gallery of ancient pottery on Friday.",
     ["exhibition of old ceramics launching at the end of the week", "historic clay vessels shown soon"],
     "museum pottery"),
    ("Our team won the final match with a goal in extra time.",
     ["squad triumphed in the championship after overtime scoring", "late winner secured the trophy game"],
     "final match goal"),
    ("Doctors recommend drinking water regularly during hot weather.",
     ["physicians advise staying hydrated when temperatures soar", "health tips about fluids in a heatwave"],
     "drinking water"),
    ("The bakery on the corner sells fresh bread every morning.",
     ["shop near the junction offering loaves at dawn", "where to buy baked goods early each day"],
     "bakery bread"),
    ("Engineers tested the rocket engine for three full minutes.",
     ["propulsion trial of the launcher lasted several moments", "spacecraft motor firing experiment"],
     "rocket engine"),
    ("The school library now lends laptops to students for free.",
     ["pupils can borrow computers without charge at the reading room", "no-cost notebook loans for learners"],
     "library laptops"),
    ("Farmers are harvesting apples earlier than usual this year.",
     ["orchard growers picking fruit ahead of schedule", "early crop collection on the farms this season"],
     "harvesting apples"),
    ("The city council voted to plant a thousand trees downtown.",
     ["local government approved greening the center with saplings", "municipal decision on urban forestry"],
     "council trees"),
    ("A new species of frog was discovered in the rainforest.",
     ["scientists found an unknown amphibian in the jungle", "previously unseen toad identified in tropical woods"],
     "species frog"),
    ("The concert was cancelled because the singer lost her voice.",
     ["show called off after the vocalist fell ill", "performance scrapped due to a throat problem"],
     "concert cancelled"),
    ("Prices at the petrol pump rose again this month.",
     ["fuel costs climbing at filling stations lately", "gasoline getting more expensive"], "petrol prices"),
    ("The hospital opened a new wing for children with cancer.",
     ["clinic expansion for young oncology patients", "pediatric tumour ward inaugurated"], "hospital children"),
    ("Volunteers cleaned plastic waste from the beach on Sunday.",
     ["people picked up litter along the shore at the weekend", "coastal rubbish collection by helpers"],
     "plastic beach"),
    ("The recipe needs two eggs, flour and a cup of milk.",
     ["ingredients for the batter include dairy and wheat", "what goes into this cake mixture"], "recipe eggs flour"),
    ("Astronomers observed a comet passing close to the sun.",
     ["stargazers watched an icy visitor near our star", "telescopes tracked a celestial body grazing the solar disc"],
     "comet sun"),
    ("The airport will add a second runway by next summer.",
     ["aviation hub expanding its landing strips", "extra tarmac for planes planned at the terminal"],
     "airport runway"),
    ("Scientists warn that glaciers are melting faster than predicted.",
     ["researchers say ice sheets shrink more quickly than forecasts", "rapid thaw of frozen rivers in the mountains"],
     "glaciers melting"),
    ("The printer on the third floor is out of paper again.",
     ["upstairs copier needs more sheets", "office printing device empty of supplies"], "printer paper"),
    ("Our internet connection drops whenever it storms outside.",
     ["network goes offline during bad weather", "wifi outages when thunder and lightning hit"], "internet connection"),
    ("The zoo welcomed a baby elephant born last night.",
     ["newborn calf at the animal park", "young pachyderm arrives at the wildlife enclosure"], "baby elephant"),
    ("Thieves stole three bicycles from the garage overnight.",
     ["burglars took several bikes during the night", "cycles were robbed from a parking shed"], "bicycles garage"),
    ("The painter finished a huge mural on the old factory wall.",
     ["artist completed a giant fresco across the disused mill", "street art covering an industrial building"],
     "mural factory"),
    ("Teachers are striking for better pay and smaller classes.",
     ["educators walk out over salaries and group sizes", "staff at schools protest wages"], "teachers striking"),
    ("The river flooded several streets near the market square.",
     ["water overflowed into roads by the bazaar", "inundation in the trading district"], "river flooded"),
    ("A famous chef opened a vegetarian restaurant on the hill.",
     ["renowned cook launches a meat-free eatery uptown", "celebrity kitchen serving plant-based dishes"],
     "chef vegetarian restaurant"),
    ("The train to the coast is delayed by forty minutes.",
     ["rail service toward the seaside running late", "railway journey to the shore held up"], "train delayed"),
    ("Children learn to swim at the public pool every Saturday.",
     ["kids take lessons in the municipal baths at weekends", "youngsters practise strokes in the leisure centre"],
     "swim pool"),
]  # fmt: skip

STOP_WORDS = frozenset(
    "a an the of to in on at by for from with and or is are was were be been will would can do does how when what "
    "where who which this that these those it its our their his her my your after before during near up about into "
    "over than more most very each every again new no not out off all any some several"
    .split()
)  # fmt: skip


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP_WORDS}


def check() -> None:
    """Every paraphrase shares no content word with its passage; every keyword query's words are in it."""
    for passage, paraphrases, keywords in PASSAGES:
        words = content_words(passage)
        for query in paraphrases:
            shared = words & content_words(query)
            assert not shared, f"{query!r} shares {sorted(shared)} with {passage!r}"
        assert content_words(keywords) <= words, f"{keywords!r} is not in {passage!r}"
    assert len(PASSAGES) >= 30 and len({p for p, _, _ in PASSAGES}) == len(PASSAGES)


if __name__ == "__main__":
    check()
    print(f"{len(PASSAGES)} passages, {2 * len(PASSAGES)} paraphrase and {len(PASSAGES)} keyword queries: ok")
