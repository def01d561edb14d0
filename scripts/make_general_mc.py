"""Write samples/general/mc.jsonl: the general-knowledge multiple-choice set `shardtune eval` ships.

    python scripts/make_general_mc.py

Every question is generated here from small fact tables the project wrote (capitals, continents,
languages, chemical symbols, animals, opposites, units, shapes, arithmetic), with wrong choices
drawn from the same table, so no benchmark's text is copied. Deterministic: a rerun writes the same
bytes. One record per line:

    {"id": "capital-007", "category": "capital", "question": "...", "choices": [4 strings], "answer": 2}
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "samples" / "general" / "mc.jsonl"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago",
    "Russia": "Moscow", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Vietnam": "Hanoi", "Indonesia": "Jakarta", "Philippines": "Manila",
    "Iran": "Tehran", "Iraq": "Baghdad", "Saudi Arabia": "Riyadh", "Ethiopia": "Addis Ababa",
    "Ghana": "Accra", "Colombia": "Bogota", "Venezuela": "Caracas", "Cuba": "Havana",
    "Argentina": "Buenos Aires", "Czech Republic": "Prague", "Romania": "Bucharest", "Ukraine": "Kyiv",
    "Iceland": "Reykjavik", "Morocco": "Rabat", "Nepal": "Kathmandu", "Pakistan": "Islamabad",
    "New Zealand": "Wellington", "Switzerland": "Bern",
}
CONTINENTS = {
    "France": "Europe", "Germany": "Europe", "Norway": "Europe", "Poland": "Europe", "Portugal": "Europe",
    "Ireland": "Europe", "Hungary": "Europe", "Japan": "Asia", "China": "Asia", "Thailand": "Asia",
    "Vietnam": "Asia", "Nepal": "Asia", "Mongolia": "Asia", "Kenya": "Africa", "Egypt": "Africa",
    "Ghana": "Africa", "Ethiopia": "Africa", "Nigeria": "Africa", "Morocco": "Africa", "Senegal": "Africa",
    "Peru": "South America", "Chile": "South America", "Colombia": "South America",
    "Argentina": "South America", "Bolivia": "South America", "Uruguay": "South America",
    "Canada": "North America", "Mexico": "North America", "Cuba": "North America",
    "Guatemala": "North America", "Australia": "Oceania", "New Zealand": "Oceania", "Fiji": "Oceania",
}
LANGUAGES = {  # countries with one clearly main language, so no wrong choice is also right
    "Brazil": "Portuguese", "Portugal": "Portuguese", "Mexico": "Spanish", "Argentina": "Spanish",
    "Spain": "Spanish", "Japan": "Japanese", "France": "French", "Germany": "German", "Austria": "German",
    "Italy": "Italian", "Russia": "Russian", "Poland": "Polish", "Greece": "Greek", "Turkey": "Turkish",
    "South Korea": "Korean", "Thailand": "Thai", "Vietnam": "Vietnamese", "Sweden": "Swedish",
    "Netherlands": "Dutch", "Hungary": "Hungarian", "Iran": "Persian", "Egypt": "Arabic",
    "Saudi Arabia": "Arabic", "Finland": "Finnish",
}
ELEMENTS = {
    "H": "hydrogen", "He": "helium", "C": "carbon", "N": "nitrogen", "O": "oxygen", "Na": "sodium",
    "Mg": "magnesium", "Al": "aluminium", "Si": "silicon", "P": "phosphorus", "S": "sulfur",
    "Cl": "chlorine", "K": "potassium", "Ca": "calcium", "Fe": "iron", "Cu": "copper", "Zn": "zinc",
    "Ag": "silver", "Au": "gold", "Hg": "mercury", "Pb": "lead", "Sn": "tin", "Ne": "neon", "U": "uranium",
}
ANIMALS = {
    "whale": "mammal", "dolphin": "mammal", "bat": "mammal", "horse": "mammal", "elephant": "mammal",
    "tiger": "mammal", "kangaroo": "mammal", "eagle": "bird", "penguin": "bird", "owl": "bird",
    "sparrow": "bird", "ostrich": "bird", "parrot": "bird", "shark": "fish", "salmon": "fish", "tuna": "fish",
    "trout": "fish", "cod": "fish", "snake": "reptile", "lizard": "reptile", "crocodile": "reptile",
    "tortoise": "reptile", "frog": "amphibian", "salamander": "amphibian", "toad": "amphibian",
    "ant": "insect", "bee": "insect", "butterfly": "insect", "beetle": "insect", "mosquito": "insect",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "open": "closed", "early": "late",
    "happy": "sad", "light": "dark", "full": "empty", "strong": "weak", "rich": "poor", "wet": "dry",
    "hard": "soft", "loud": "quiet", "young": "old", "tall": "short", "clean": "dirty", "cheap": "expensive",
    "first": "last", "thick": "thin", "win": "lose", "buy": "sell", "push": "pull", "arrive": "leave",
    "inside": "outside", "above": "below", "begin": "end", "true": "false", "near": "far", "deep": "shallow",
}
QUANTITIES = [  # (question, answer); wrong choices are other numbers near it
    ("How many days are in a week?", 7), ("How many months are in a year?", 12),
    ("How many hours are in a day?", 24), ("How many minutes are in an hour?", 60),
    ("How many seconds are in a minute?", 60), ("How many centimeters are in a meter?", 100),
    ("How many meters are in a kilometer?", 1000), ("How many grams are in a kilogram?", 1000),
    ("How many days are in a leap year?", 366), ("How many days are in a common year?", 365),
    ("How many legs does a spider have?", 8), ("How many legs does an insect have?", 6),
    ("How many sides does a triangle have?", 3), ("How many sides does a square have?", 4),
    ("How many sides does a pentagon have?", 5), ("How many sides does a hexagon have?", 6),
    ("How many sides does an octagon have?", 8), ("How many continents are there?", 7),
    ("How many planets are in the Solar System?", 8), ("How many players are on a soccer team on the field?", 11),
    ("How many items are in a dozen?", 12), ("How many years are in a century?", 100),
    ("How many years are in a decade?", 10), ("How many degrees are in a right angle?", 90),
    ("How many degrees are in a full circle?", 360), ("At how many degrees Celsius does water freeze at sea level?", 0),
    ("At how many degrees Celsius does water boil at sea level?", 100), ("How many strings does a standard violin have?", 4),
    ("How many letters are in the English alphabet?", 26), ("How many weeks are in a year, rounded down?", 52),
]
SCIENCE = [  # (question, answer, wrong choices)
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Jupiter"]),
    ("Which planet is the largest in the Solar System?", "Jupiter", ["Saturn", "Earth", "Neptune"]),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Mercury"]),
    ("Which planet has the most famous ring system?", "Saturn", ["Mars", "Mercury", "Venus"]),
    ("What gas do plants take in from the air to make food?", "carbon dioxide", ["oxygen", "helium", "neon"]),
    ("What gas do people need to breathe to live?", "oxygen", ["carbon dioxide", "helium", "argon"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "NaCl", "O3"]),
    ("What force pulls objects toward the Earth?", "gravity", ["magnetism", "friction", "buoyancy"]),
    ("Which organ pumps blood through the body?", "the heart", ["the lungs", "the liver", "the stomach"]),
    ("Which organ do people breathe with?", "the lungs", ["the heart", "the kidneys", "the liver"]),
    ("What is the largest ocean on Earth?", "the Pacific Ocean", ["the Atlantic Ocean", "the Indian Ocean", "the Arctic Ocean"]),
    ("What is the closest star to the Earth?", "the Sun", ["Sirius", "Polaris", "Vega"]),
    ("What does a thermometer measure?", "temperature", ["weight", "length", "air speed"]),
    ("What does a compass needle point toward?", "magnetic north", ["the Sun", "the Moon", "the equator"]),
    ("What do bees make from the nectar of flowers?", "honey", ["milk", "silk", "wax paper"]),
    ("What is frozen water called?", "ice", ["steam", "fog", "dew"]),
    ("What is water in the form of a gas called?", "water vapour", ["ice", "sand", "smoke"]),
    ("Which color do you get by mixing blue and yellow paint?", "green", ["purple", "orange", "brown"]),
    ("Which color do you get by mixing red and white paint?", "pink", ["green", "blue", "black"]),
    ("Which color do you get by mixing red and yellow paint?", "orange", ["green", "purple", "grey"]),
    ("Which color do you get by mixing red and blue paint?", "purple", ["yellow", "green", "orange"]),
    ("How does the Moon shine at night?", "it reflects sunlight", ["it burns gas", "it is made of glowing rock", "it glows from electricity"]),
    ("What causes day and night on Earth?", "the Earth spinning on its axis", ["the Moon moving", "the Sun switching off", "clouds covering the Sun"]),
    ("Which of these is a renewable source of energy?", "wind", ["coal", "oil", "natural gas"]),
    ("What is the hardest natural material?", "diamond", ["gold", "iron", "glass"]),
]


def choices_for(answer, pool, rng: random.Random, k: int = 3):
    """The answer and k different wrong choices from `pool`, shuffled; returns (choices, answer index)."""
    wrong = sorted({p for p in pool if p != answer})
    picked = rng.sample(wrong, k)
    choices = picked + [answer]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def near_numbers(answer: int, rng: random.Random):
    candidates = {answer + d for d in (-3, -2, -1, 1, 2, 3, 4, 5, 10, -10) if answer + d >= 0}
    candidates |= {answer * 2, max(answer // 2, 1)}
    candidates.discard(answer)
    return [str(n) for n in sorted(candidates)]


def questions(rng: random.Random):
    for country, city in CAPITALS.items():
        yield "capital", f"What is the capital of {country}?", city, list(CAPITALS.values())
    for country, continent in CONTINENTS.items():
        yield "continent", f"On which continent is {country}?", continent, sorted(set(CONTINENTS.values()))
    for country, language in LANGUAGES.items():
        yield "language", f"Which language do most people in {country} speak?", language, sorted(set(LANGUAGES.values()))
    for symbol, name in ELEMENTS.items():
        yield "element", f"Which chemical element has the symbol {symbol}?", name, list(ELEMENTS.values())
    for symbol, name in ELEMENTS.items():
        yield "symbol", f"What is the chemical symbol of {name}?", symbol, list(ELEMENTS)
    for animal, group in ANIMALS.items():
        yield "animal", f"What kind of animal is {article(animal)}?", article(group), sorted({article(g) for g in ANIMALS.values()})
    antonyms = [w for pair in OPPOSITES.items() for w in pair]
    for word, opposite in OPPOSITES.items():
        yield "opposite", f"What is the opposite of \"{word}\"?", opposite, [w for w in antonyms if w != word]
    for question, answer in QUANTITIES:
        yield "quantity", question, str(answer), near_numbers(answer, rng)
    for question, answer, wrong in SCIENCE:
        yield "science", question, answer, [answer, *wrong]
    for op, count, low, high in (("times", 40, 2, 12), ("plus", 30, 10, 99)):
        seen = set()
        while len(seen) < count:
            a, b = rng.randint(low, high), rng.randint(low, high)
            if (a, b) in seen:
                continue
            seen.add((a, b))
            result = a * b if op == "times" else a + b
            yield "arithmetic", f"What is {a} {op} {b}?", str(result), near_numbers(result, rng)


def main(out: Path = OUT) -> None:
    rng = random.Random(20261207)
    rows, counts = [], {}
    for category, question, answer, pool in questions(rng):
        choices, index = choices_for(answer, pool, rng)
        counts[category] = counts.get(category, 0) + 1
        rows.append({"id": f"{category}-{counts[category]:03d}", "category": category, "question": question,
                     "choices": choices, "answer": index})
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{out}: {len(rows)} questions ({', '.join(f'{k} {v}' for k, v in counts.items())})")


if __name__ == "__main__":
    main()
