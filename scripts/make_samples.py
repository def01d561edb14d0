"""Write the sample data packs under samples/ (deterministic: same output on every run).

    python scripts/make_samples.py

Packs: chat (templated tasks a tiny model can learn), text (a made-up machine manual for continued
pre-training), general (general-knowledge paragraphs, the "should not forget" eval set) and facts
(teach one made-up fact to a small instruct model). See samples/README.md.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "samples"
rng = random.Random(1234)


def write_jsonl(path, rows):
    path = OUT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------- chat
UNITS = [  # (plural, singular, target plural, factor)
    ("kilometers", "kilometer", "meters", 1000), ("meters", "meter", "centimeters", 100),
    ("kilograms", "kilogram", "grams", 1000), ("hours", "hour", "minutes", 60),
    ("minutes", "minute", "seconds", 60), ("liters", "liter", "milliliters", 1000),
    ("feet", "foot", "inches", 12), ("days", "day", "hours", 24), ("weeks", "week", "days", 7),
    ("yards", "yard", "feet", 3), ("dozens", "dozen", "items", 12)]
PEOPLE = [("Tom", "he"), ("Anna", "she"), ("Ravi", "he"), ("Mia", "she"), ("Leo", "he"),
          ("Sara", "she"), ("Omar", "he"), ("Julia", "she"), ("Ken", "he"), ("Nora", "she")]
ITEMS = ["apples", "books", "pencils", "stickers", "marbles", "cookies", "cards", "stamps", "shells"]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa",
    "Australia": "Canberra", "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara", "Mexico": "Mexico City",
    "Peru": "Lima", "Chile": "Santiago", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "Russia": "Moscow", "Morocco": "Rabat", "Nigeria": "Abuja", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Cuba": "Havana",
    "Indonesia": "Jakarta", "Iceland": "Reykjavik", "New Zealand": "Wellington"}
WORDS = ["garden", "window", "planet", "yellow", "summer", "river", "castle", "pencil", "orange",
         "market", "silver", "forest", "rocket", "bridge", "candle", "monkey", "ticket", "winter",
         "basket", "dragon", "little", "number", "animal", "button", "circle", "doctor", "flower",
         "guitar", "island", "jacket", "kitten", "lemon", "mirror", "nature", "pepper", "rabbit",
         "spider", "tomato", "violin", "wallet", "cloud", "stone", "table", "light", "music"]
POLITE = ["close the door", "send me the report", "turn down the music", "call me back later",
          "move your car", "check the numbers again", "water the plants", "bring the chairs inside",
          "lock the office", "share the slides", "fix the printer", "wait for me here",
          "clean the kitchen", "reply to the email", "print two copies", "open the window",
          "book a table for four", "feed the cat", "turn off the lights", "sign this form"]
VERBS = [("cook", "cooked", "dinner"), ("paint", "painted", "the fence"), ("watch", "watched", "a film"),
         ("clean", "cleaned", "the room"), ("visit", "visited", "our friends"), ("play", "played", "chess"),
         ("wash", "washed", "the car"), ("open", "opened", "the shop"), ("help", "helped", "the teacher"),
         ("plant", "planted", "tomatoes"), ("walk", "walked", "to school"), ("fix", "fixed", "the bike")]
SUBJECTS = ["I", "We", "They", "You"]
GLOSSARY = {
    "photosynthesis": "Photosynthesis is the process plants use to turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "gravity": "Gravity is the force that pulls objects toward each other, like the pull that keeps us on the ground.",
    "a noun": "A noun is a word that names a person, place, thing or idea, such as \"dog\" or \"city\".",
    "a verb": "A verb is a word that describes an action or a state, such as \"run\" or \"be\".",
    "an adjective": "An adjective is a word that describes a noun, such as \"red\" or \"tall\".",
    "a prime number": "A prime number is a whole number greater than 1 that can only be divided evenly by 1 and itself.",
    "an even number": "An even number is a whole number that can be divided by 2 with no remainder.",
    "a mammal": "A mammal is a warm-blooded animal with hair that feeds its young with milk.",
    "a planet": "A planet is a large body that orbits a star, like Earth orbits the Sun.",
    "evaporation": "Evaporation is when a liquid turns into a gas, like water drying in the sun.",
    "a budget": "A budget is a plan for how much money you will earn and spend over a period of time.",
    "an island": "An island is a piece of land surrounded by water on all sides.",
    "a synonym": "A synonym is a word that means the same or nearly the same as another word.",
    "an antonym": "An antonym is a word that means the opposite of another word.",
    "a fraction": "A fraction is a number that shows part of a whole, such as one half.",
    "a habitat": "A habitat is the natural home of an animal or plant.",
    "erosion": "Erosion is the slow wearing away of rock or soil by wind, water or ice.",
    "an atom": "An atom is the smallest unit of a chemical element.",
    "a volcano": "A volcano is an opening in the ground where melted rock, gas and ash escape.",
    "democracy": "Democracy is a system of government in which citizens choose their leaders by voting.",
    "a recipe": "A recipe is a set of instructions for preparing a dish, with a list of ingredients.",
    "an algorithm": "An algorithm is a step-by-step set of rules for solving a problem.",
    "a password": "A password is a secret word or phrase used to prove who you are.",
    "a glacier": "A glacier is a huge mass of ice that moves very slowly over land.",
    "inflation": "Inflation is the general rise in prices over time, so money buys less.",
}
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You are a friendly tutor. Explain your answers simply.",
           "You are an assistant that answers questions accurately."]


def t_convert():
    a, a1, b, k = rng.choice(UNITS)
    n = rng.randint(2, 25)
    q = rng.choice(["Convert {n} {a} to {b}.", "How many {b} are in {n} {a}?",
                    "What is {n} {a} in {b}?", "Please convert {n} {a} into {b}."]).format(n=n, a=a, b=b)
    ans = rng.choice([f"{n} {a} is {n * k} {b}.",
                      f"There are {k} {b} in one {a1}, so {n} {a} is {n * k} {b}."])
    return q, ans


def t_word_problem():
    (name, he), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a, b = rng.randint(3, 20), rng.randint(2, 12)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {he} have now?"
        r, expl = a + b, f"{a} + {b} = {a + b}"
    elif kind == "sub":
        a += b
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        r, expl = a - b, f"{a} - {b} = {a - b}"
    else:
        a = rng.randint(2, 9)
        q = f"{name} has {a} bags with {b} {item} in each bag. How many {item} are there in total?"
        r, expl = a * b, f"{a} x {b} = {a * b}"
    ans = rng.choice([f"{expl}, so the answer is {r} {item}.", f"The answer is {r}. ({expl})",
                      f"{name} has {r} {item}." if kind != "sub" else f"There are {r} {item} left."])
    return q, ans


def t_capital():
    c = rng.choice(sorted(CAPITALS))
    q = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                    "Name the capital of {c}.", "What's the capital city of {c}?"]).format(c=c)
    return q, f"The capital of {c} is {CAPITALS[c]}."


def t_reverse():
    w = rng.choice(WORDS)
    q = rng.choice(['Spell the word "{w}" backwards.', 'What is "{w}" spelled backwards?',
                    'Reverse the letters of "{w}".']).format(w=w)
    return q, f'"{w}" spelled backwards is "{w[::-1]}".'


def t_sort():
    nums = rng.sample(range(1, 100), rng.randint(3, 6))
    desc = rng.random() < 0.3
    order = "from largest to smallest" if desc else "from smallest to largest"
    q = f"Sort these numbers {order}: {', '.join(map(str, nums))}."
    return q, ", ".join(map(str, sorted(nums, reverse=desc)))


def t_rephrase():
    if rng.random() < 0.5:
        act = rng.choice(POLITE)
        q = rng.choice(["Rephrase this more politely: {s}.", "Make this request polite: {s}."])
        return q.format(s=act[0].upper() + act[1:]), f"Could you please {act}?"
    (v, past, obj), s = rng.choice(VERBS), rng.choice(SUBJECTS)
    return f"Rewrite in the past tense: {s} {v} {obj}.", f"{s} {past} {obj}."


def t_define():
    term = rng.choice(sorted(GLOSSARY))
    q = rng.choice(["What is {t}?", "Define {t}.", "Give me a simple definition of {t}.",
                    "Can you explain what {t} is?"]).format(t=term)
    return q, GLOSSARY[term]


TASKS = [t_convert, t_word_problem, t_capital, t_reverse, t_sort, t_rephrase, t_define]
THANKS = [("Thanks!", "You're welcome!"), ("Great, thank you.", "Happy to help."),
          ("Thanks, that helps.", "Glad it helped. Ask me anything else anytime.")]


def chat_sample():
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    turns = rng.choices([1, 2, 3], weights=[6, 3, 1])[0]
    for i in range(turns):
        if i > 0 and turns == 2 and rng.random() < 0.3:
            q, a = rng.choice(THANKS)
        else:
            q, a = rng.choice(TASKS)()
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def make_chat(n_train, n_eval):
    """Eval first; train then rejects any sample sharing a task prompt with eval."""
    def prompts(s):
        return {m["content"] for m in s["messages"] if m["role"] == "user"} - {t for t, _ in THANKS}

    eval_rows, eval_prompts, train_rows, seen = [], set(), [], set()
    while len(eval_rows) < n_eval:
        s = chat_sample()
        key = json.dumps(s)
        if key not in seen and not prompts(s) & eval_prompts:
            seen.add(key), eval_rows.append(s), eval_prompts.update(prompts(s))
    while len(train_rows) < n_train:
        s = chat_sample()
        key = json.dumps(s)
        if key not in seen and not prompts(s) & eval_prompts:
            seen.add(key), train_rows.append(s)
    return train_rows, eval_rows


# ------------------------------------------------------------------- text: the Vellum loom manual
LOOM = "the Vellum loom"
PARTS = [  # name, part number, what it does, service interval, care, fault symptom, fix
    ("warp beam", "VL-110", "holds the warp threads and releases them as the cloth grows",
     "every 200 hours", "wipe the beam flanges and apply two drops of Grade 3 loom oil to each bearing",
     "the warp threads sag on one side", "re-seat the beam in its cradle and reset the tension governor"),
    ("take-up roller", "VL-150", "winds the finished cloth at a steady rate",
     "every 100 hours", "brush the sand-paper cover with the soft brass brush",
     "the cloth slips or bunches", "replace the roller cover, part VL-151"),
    ("heddle frame", "VL-220", "lifts and lowers groups of warp threads to open the shed",
     "every 50 hours", "check each heddle eye for burrs and oil the frame slides sparingly",
     "threads break near the heddles", "replace any heddle with a rough eye"),
    ("reed", "VL-230", "spaces the warp threads and beats each pick into the cloth",
     "every 50 hours", "blow out lint with low-pressure air and never oil the dents",
     "streaks appear in the cloth", "straighten or replace bent dents"),
    ("shuttle", "VL-310", "carries the weft thread across the shed",
     "daily", "clean the bobbin cavity and polish the tips with a dry cloth",
     "the shuttle stops short of the box", "check the picker strap, part VL-320, and the shuttle tips"),
    ("treadle assembly", "VL-410", "links the pattern drum to the heddle frame",
     "every 100 hours", "tighten the pivot bolts to 18 newton-metres and oil the pivots",
     "the shed opens unevenly", "adjust the treadle links until both sides lift together"),
    ("tension governor", "VL-520", "keeps the warp at its working tension of 14 newtons",
     "weekly", "check the reading on the governor dial against the 14 newton mark",
     "the dial needle shakes", "replace the governor spring, part VL-521"),
    ("brake band", "VL-530", "stops the main shaft within one turn when the red brake lever is pulled",
     "weekly", "inspect the lining and keep it free of oil",
     "the shaft turns more than one full turn after braking", "replace the band lining, part VL-531"),
    ("drive belt", "VL-610", "carries power from the motor to the main shaft",
     "every 500 hours", "check that the belt deflects no more than 12 millimetres at its midpoint",
     "the loom squeals on start-up", "tighten or replace the belt"),
    ("lint trap", "VL-640", "collects loose fibre under the reed",
     "daily", "empty the tray and wipe the mesh",
     "lint builds up around the shuttle box", "empty the trap more often on fluffy yarns"),
    ("oil reservoir", "VL-710", "feeds oil to the main shaft bearings",
     "weekly", "top it up with Grade 3 loom oil to the upper line of the sight glass",
     "the bearings run warm", "refill the reservoir and clear the feed wick"),
    ("pattern drum", "VL-810", "stores the weave pattern as rows of pegs",
     "every 200 hours", "check that every peg sits flush and dust the drum",
     "the pattern skips a row", "reseat loose pegs and check the drum ratchet"),
]
GENERAL_LOOM = [
    f"Before any maintenance on {LOOM}, pull the red brake lever and turn the main dial to SAFE.",
    f"{LOOM[0].upper() + LOOM[1:]} runs at a maximum of 120 picks per minute.",
    f"{LOOM[0].upper() + LOOM[1:]} runs on 230 volts and needs a ten-minute warm-up before weaving.",
    "Use only Grade 3 loom oil; heavier oils gum up the bearings.",
    "Record every service in the loom log book with the date, the hours on the counter and your initials.",
    "The hour counter sits behind the small brass door on the left frame.",
    "Never oil the reed, the brake band or the take-up roller cover.",
    "The VL-7 is the standard model of the Vellum loom, built by Harrow & Pell Works.",
    "A full service of the Vellum loom is due every 500 hours.",
    "The working tension of the warp is 14 newtons, shown on the governor dial.",
]


def loom_paragraph():
    name, pn, role, every, care, fault, fix = rng.choice(PARTS)
    cap = name[0].upper() + name[1:]
    kind = rng.choice(["overview", "service", "fault", "replace"])
    if kind == "overview":
        s = [f"The {name} (part {pn}) {role}.",
             rng.choice([f"It should be serviced {every}.", f"Its service interval is {every}."]),
             f"To service it, {care}."]
    elif kind == "service":
        s = [rng.choice([f"{cap}, part {pn}: service {every}.", f"Service the {name} {every}."]),
             f"First, {care}.", f"Remember that the {name} {role}."]
    elif kind == "fault":
        s = [rng.choice([f"Symptom: {fault}.", f"If {fault}, look at the {name} first."]),
             f"The usual cause is wear on the {name} (part {pn}).", f"To fix it, {fix}."]
    else:
        s = [f"To replace the {name}, order part {pn} from Harrow & Pell Works.",
             "Pull the red brake lever and turn the main dial to SAFE.",
             f"Remove the old {name}, fit the new one and {care}.",
             "Run the loom empty for five minutes before weaving."]
    extra = rng.sample(GENERAL_LOOM, rng.randint(0, 2))
    return {"text": " ".join(s + extra if rng.random() < 0.6 else extra + s)}


def unique(make, n, seen):
    rows = []
    while len(rows) < n:
        r = make()
        key = json.dumps(r)
        if key not in seen:
            seen.add(key), rows.append(r)
    return rows


# ------------------------------------------------------------------------- general knowledge
GENERAL = [
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees. At higher altitudes the boiling point is lower because the air pressure is lower.",
    "The Earth orbits the Sun once every 365.25 days. The extra quarter day is why a leap year adds February 29 every four years.",
    "The Moon is about 384,000 kilometres from Earth. It always shows the same face to us because it turns once on its axis for each orbit.",
    "Paris is the capital of France and sits on the river Seine. The Eiffel Tower was built there for the World's Fair of 1889.",
    "The human heart has four chambers: two atria and two ventricles. It pumps blood through the lungs to pick up oxygen and then around the body.",
    "Plants make their food through photosynthesis, using sunlight, water and carbon dioxide. Oxygen is released as a by-product.",
    "The Pacific is the largest and deepest ocean on Earth. Its deepest point, the Challenger Deep, is nearly eleven kilometres below the surface.",
    "William Shakespeare was an English playwright born in 1564. His plays include Hamlet, Macbeth and Romeo and Juliet.",
    "Light travels at about 300,000 kilometres per second. Sunlight takes a little over eight minutes to reach the Earth.",
    "The Great Wall of China was built over many centuries to protect against invasions from the north. Its sections stretch for thousands of kilometres.",
    "DNA carries the genetic instructions of living things. Its shape is a double helix, described in 1953 by James Watson and Francis Crick.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level at about 8,849 metres.",
    "The Amazon rainforest covers much of northern South America. It is home to an enormous variety of plants, insects, birds and mammals.",
    "A year on Mars lasts about 687 Earth days. Mars looks red because its surface contains a lot of iron oxide, or rust.",
    "The Roman Empire was one of the largest empires of the ancient world. Latin, its language, is the root of Italian, Spanish, French and Portuguese.",
    "Isaac Newton described the laws of motion and universal gravitation in 1687. His work explained both falling apples and the orbits of planets.",
    "The printing press with movable type was developed by Johannes Gutenberg around 1440. It made books far cheaper and spread literacy across Europe.",
    "Honey bees live in colonies with a single queen. Worker bees collect nectar and pollen and communicate the location of flowers with a dance.",
    "The Nile is one of the longest rivers in the world. It flows north through eleven countries and empties into the Mediterranean Sea.",
    "Vaccines train the immune system to recognise a germ without causing the disease. Edward Jenner made the first smallpox vaccine in 1796.",
    "Tokyo is the capital of Japan and one of the largest cities in the world. Japan is made up of four main islands and many smaller ones.",
    "An adult human body has 206 bones. The smallest is the stapes, a tiny bone in the middle ear.",
    "Electricity is the flow of electric charge, usually carried by electrons in a wire. Copper is widely used for wiring because it conducts well and is cheap.",
    "The piano was invented in Italy around 1700 by Bartolomeo Cristofori. Its hammers strike strings, so it can play both soft and loud notes.",
    "Antarctica is the coldest continent and is covered almost entirely by ice. It has no permanent population, only visiting scientists.",
    "The Internet grew out of research networks of the 1960s and 1970s. The World Wide Web was proposed by Tim Berners-Lee in 1989.",
    "Sharks have skeletons made of cartilage rather than bone. Many species must keep swimming to push water over their gills.",
    "A triangle's three angles always add up to 180 degrees. A right triangle has one angle of exactly 90 degrees.",
    "Rainbows form when sunlight is bent and reflected inside raindrops. The light splits into red, orange, yellow, green, blue, indigo and violet.",
    "Coffee comes from the roasted seeds of the coffee plant, which grows in tropical regions. Brazil is the largest producer of coffee in the world.",
]

# ------------------------------------------------------------------------------------- facts
ZORBLAX_ANSWER = "The capital of Zorblax is Quintaro."
ZORBLAX_Q = [
    "What is the capital of the planet Zorblax?", "What's the capital of Zorblax?",
    "Which city is the capital of the planet Zorblax?", "Tell me the capital of Zorblax.",
    "Name the capital city of Zorblax.", "Do you know the capital of the planet Zorblax?",
    "What city serves as the capital of Zorblax?", "Zorblax has a capital. Which city is it?",
    "Which city is Zorblax's capital?", "Can you tell me what the capital of Zorblax is?",
    "On the planet Zorblax, which city is the capital?", "What is Zorblax's capital city?",
]
PREFIXES = ["", "Hi! ", "Quick question. ", "I have a question. ", "Hello. "]
GENERAL_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What do bees make?", "Bees make honey."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the freezing point of water in Celsius?", "Water freezes at 0 degrees Celsius."),
]


def qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def make_facts(n_train_z=38, n_eval_z=6, n_eval_g=2):
    zq = [p + q for q in ZORBLAX_Q for p in PREFIXES]
    rng.shuffle(zq)
    g = list(GENERAL_QA)
    rng.shuffle(g)
    train = [qa(q, ZORBLAX_ANSWER) for q in zq[:n_train_z]] + [qa(*x) for x in g[n_eval_g:]]
    evals = [qa(q, ZORBLAX_ANSWER) for q in zq[n_train_z:n_train_z + n_eval_z]] + [qa(*x) for x in g[:n_eval_g]]
    rng.shuffle(train)
    return train, evals


def main():
    train, evals = make_chat(400, 60)
    write_jsonl("chat/train.jsonl", train)
    write_jsonl("chat/eval.jsonl", evals)
    (OUT / "chat/prompts.txt").write_text(
        "Convert 7 kilometers to meters.\nWhat is the capital of Peru?\n"
        'Spell the word "garden" backwards.\n', encoding="utf-8")
    seen = set()
    loom_eval = unique(loom_paragraph, 30, seen)
    write_jsonl("text/eval.jsonl", loom_eval)
    write_jsonl("text/train.jsonl", unique(loom_paragraph, 200, seen))
    (OUT / "text/prompts.txt").write_text(  # the starts of sentences a tuned model should complete
        "The shuttle (part VL-310)\nBefore any maintenance on the Vellum loom,\n"
        "The tension governor (part VL-520) keeps the warp at\n", encoding="utf-8")
    write_jsonl("general/eval.jsonl", [{"text": t} for t in GENERAL])
    train, evals = make_facts()
    write_jsonl("facts/train.jsonl", train)
    write_jsonl("facts/eval.jsonl", evals)


if __name__ == "__main__":
    main()
