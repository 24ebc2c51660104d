"""Form tasks: both base models already hold the knowledge; the LoRA only teaches how to answer.

    capital   "The capital of France is"   -> "Paris"     (then stop)
    plural    "The plural of mouse is"     -> "mice"      (then stop)

With a 3-shot prompt both default models name the right word most of the time (capital:
SmolLM2 0.81, Gemma-3 0.96; plural: 0.93, 0.98 on the first word); zero-shot, Gemma-3 goes
on with a sentence ("the capital of the country of France.") or repeats the noun, so its
exact match is 0.00 (docs/results.md#form-and-skill-tasks). What a LoRA adds here is the
answer's form, which is what a transfer should carry most easily.

Items, not prompts, are split: a country or noun in the test set never appears in training
under any frame, so a score measures the form learned, not answers memorised.
"""
from __future__ import annotations

import random

CAPITALS = dict(pair.split(":") for pair in (
    "France:Paris Germany:Berlin Italy:Rome Spain:Madrid Japan:Tokyo China:Beijing Russia:Moscow "
    "Egypt:Cairo Greece:Athens Portugal:Lisbon Canada:Ottawa Ireland:Dublin Norway:Oslo "
    "Sweden:Stockholm Finland:Helsinki Denmark:Copenhagen Poland:Warsaw Austria:Vienna "
    "Hungary:Budapest Belgium:Brussels Turkey:Ankara Iran:Tehran Iraq:Baghdad Kenya:Nairobi "
    "Thailand:Bangkok Vietnam:Hanoi Indonesia:Jakarta Peru:Lima Cuba:Havana Romania:Bucharest "
    "Pakistan:Islamabad Afghanistan:Kabul Venezuela:Caracas Iceland:Reykjavik Syria:Damascus "
    "Lebanon:Beirut Bulgaria:Sofia Serbia:Belgrade Croatia:Zagreb Nepal:Kathmandu Ghana:Accra "
    "Libya:Tripoli Qatar:Doha Bangladesh:Dhaka Estonia:Tallinn Latvia:Riga Lithuania:Vilnius "
    "Uruguay:Montevideo Australia:Canberra Netherlands:Amsterdam Switzerland:Bern Chile:Santiago "
    "Colombia:Bogota Argentina:Buenos_Aires India:New_Delhi Philippines:Manila Malaysia:Kuala_Lumpur "
    "Ethiopia:Addis_Ababa Morocco:Rabat Algeria:Algiers Tunisia:Tunis Sudan:Khartoum Nigeria:Abuja "
    "Uganda:Kampala Zimbabwe:Harare Mongolia:Ulaanbaatar Jordan:Amman Slovakia:Bratislava "
    "Slovenia:Ljubljana Ecuador:Quito Bolivia:Sucre Paraguay:Asuncion Jamaica:Kingston "
    "Scotland:Edinburgh Wales:Cardiff England:London Ukraine:Kyiv Belarus:Minsk Georgia:Tbilisi "
    "Armenia:Yerevan Cambodia:Phnom_Penh Laos:Vientiane Senegal:Dakar Somalia:Mogadishu").split())
CAPITALS = {k: v.replace("_", " ") for k, v in CAPITALS.items()}
CAPITAL_FRAMES = ("The capital of {x} is", "The capital city of {x} is", "{x}'s capital city is")

_IRREGULAR = {
    "child": "children", "man": "men", "woman": "women", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "person": "people", "knife": "knives", "leaf": "leaves",
    "wife": "wives", "wolf": "wolves", "life": "lives", "half": "halves", "shelf": "shelves",
    "loaf": "loaves", "thief": "thieves", "ox": "oxen", "cactus": "cacti", "fungus": "fungi",
    "crisis": "crises", "analysis": "analyses", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "echo": "echoes",
}
_NOUNS = (
    "cat dog house car tree book chair table apple bird girl boy city baby box bus church glass "
    "key day toy boat horse cow pen cup lamp door window road river mountain lake island forest "
    "flower garden street bridge tower castle village farm school teacher student doctor nurse "
    "lawyer farmer king queen prince princess soldier sailor pilot driver singer dancer painter "
    "writer friend brother sister uncle cousin neighbour bottle plate spoon fork bowl pot kettle "
    "clock watch phone camera computer letter stamp ticket coin wallet basket bag hat coat shirt "
    "dress shoe sock glove ring bell drum guitar piano song story poem picture map flag ship "
    "train plane bike truck wheel engine machine tool hammer nail brush comb mirror candle "
    "pillow blanket bed sofa desk shelf room kitchen bath wall roof floor gate fence field hill "
    "valley cloud storm star planet moon ocean wave beach stone rock sand leaf branch root seed "
    "fruit berry cherry lemon orange banana peach carrot onion egg cake cookie sandwich lady "
    "party family country city library museum hospital factory office market shop bank "
    "kiss fox dish watch brush class wish beach bench match inch tax quiz").split()


def plural(noun: str) -> str:
    if noun in _IRREGULAR:
        return _IRREGULAR[noun]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


PLURALS = {n: plural(n) for n in dict.fromkeys([*_NOUNS, *_IRREGULAR])}
PLURAL_FRAMES = ("The plural of {x} is", "The plural form of {x} is")


def split_items(items: list[str], name: str, seed: int, test_fraction: float = 0.4) -> dict[str, list[str]]:
    """Disjoint item lists for 'test' and 'train', fixed by the task name and seed."""
    order = sorted(items)
    random.Random(f"{name}/{seed}/items").shuffle(order)
    k = round(test_fraction * len(order))
    return {"test": order[:k], "train": order[k:]}


def _space(name: str, table: dict[str, str], frames: tuple[str, ...], split: str,
           seed: int) -> list[tuple[str, str, str]]:
    """(prompt, answer, item) of one split, every frame of every item, in a seeded order.
    The item travels with each prompt: a country's three frames are one draw, not three."""
    items = split_items(list(table), name, seed)[split]
    out = [(f.format(x=x), table[x], x) for x in items for f in frames]
    random.Random(f"{name}/{seed}/{split}").shuffle(out)
    return out


def capital_space(split: str, seed: int) -> list[tuple[str, str, str]]:
    return _space("capital", CAPITALS, CAPITAL_FRAMES, split, seed)


def plural_space(split: str, seed: int) -> list[tuple[str, str, str]]:
    return _space("plural", PLURALS, PLURAL_FRAMES, split, seed)
