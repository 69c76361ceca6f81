"""Probing datasets generated from templates: exact labels by construction.

- :func:`templated_dataset` ``("pos")``: short sentences built from slot templates such as
  ``DET ADJ NOUN VERB ADP DET NOUN .``, each word labelled with its slot's UPOS tag;
  ``("number")``: ``"The keys near the cabinet"``, labelled with the grammatical number of the
  subject (``singular``/``plural``), with an attractor noun of independent number last, so the
  last token alone does not give the answer.
- :func:`country_dataset`: prompts of a relational task (``mechprobe.tasks._task``) in several variants
  (templates x number of shots), labelled by *which country the prompt is about*
  (``target="country"``), or by *whether the expected answer is a capital city*
  (``target="is_capital"``: 1 for the capitals task's prompts, 0 for a contrast task's prompts, e.g.
  past tense, whose answers are verbs; balanced). Both are read at the last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from mechprobe.core import check_seed
from mechprobe.probing._datasets import ProbingDataset
from mechprobe.tasks import Task, load_task

__all__ = ["country_dataset", "templated_dataset"]

_WORDS: dict[str, tuple[str, ...]] = {
    "DET": ("the", "this", "that", "every"),
    "ADJ": (
        "old",
        "young",
        "quiet",
        "bright",
        "heavy",
        "small",
        "tall",
        "angry",
        "happy",
        "green",
        "cold",
        "famous",
        "tired",
        "clever",
        "narrow",
        "wooden",
    ),
    "NOUN": (
        "farmer",
        "teacher",
        "doctor",
        "river",
        "garden",
        "window",
        "bottle",
        "kitchen",
        "village",
        "mountain",
        "pencil",
        "lawyer",
        "carpet",
        "bakery",
        "student",
        "elephant",
        "island",
        "tunnel",
        "bridge",
        "castle",
    ),
    "NOUNS": (
        "farmers",
        "teachers",
        "children",
        "students",
        "doctors",
        "soldiers",
        "tourists",
        "workers",
        "sailors",
        "nurses",
    ),
    "VERBI": (
        "arrived",
        "slept",
        "laughed",
        "waited",
        "smiled",
        "vanished",
        "shouted",
        "stumbled",
        "returned",
        "paused",
    ),
    "VERBT": (
        "painted",
        "cleaned",
        "opened",
        "visited",
        "carried",
        "repaired",
        "noticed",
        "described",
        "borrowed",
        "followed",
    ),
    "VERBB": (
        "repair",
        "visit",
        "clean",
        "open",
        "carry",
        "describe",
        "borrow",
        "follow",
        "paint",
        "notice",
    ),
    "AUX": ("will", "could", "should", "might", "must"),
    "ADV": (
        "quietly",
        "slowly",
        "carefully",
        "suddenly",
        "loudly",
        "happily",
        "patiently",
        "briefly",
    ),
    "ADP": ("near", "behind", "beside", "toward"),
    "PRON": ("she", "he", "they", "we"),
    "PRONO": ("him", "her", "them", "us"),
    "PROPN": ("Maria", "John", "Ahmed", "Lucy", "Peter", "Chen", "Olga", "Carlos"),
    "NUM": ("two", "three", "four", "five", "seven"),
    "CCONJ": ("and", "or"),
}
# Slot -> UPOS tag (slots with a suffix share a tag, e.g. plural nouns).
_TAG = {"NOUNS": "NOUN", "VERBI": "VERB", "VERBT": "VERB", "VERBB": "VERB", "PRONO": "PRON"}
_TEMPLATES = (
    "DET ADJ NOUN VERBI ADP DET NOUN .",
    "PRON VERBT DET ADJ NOUN ADV .",
    "PROPN AUX VERBB DET NOUN .",
    "DET NOUN CCONJ DET NOUN VERBI ADV .",
    "NUM NOUNS VERBI ADP DET NOUN .",
    "PROPN VERBT PRONO ADV .",
    "DET NOUN AUX ADV VERBB DET ADJ NOUN .",
)
_SUBJECTS = (
    ("key", "keys"),
    ("box", "boxes"),
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("dog", "dogs"),
    ("book", "books"),
    ("painting", "paintings"),
    ("student", "students"),
    ("letter", "letters"),
    ("mouse", "mice"),
    ("bottle", "bottles"),
    ("chair", "chairs"),
    ("lamp", "lamps"),
    ("teacher", "teachers"),
    ("flower", "flowers"),
)
_ATTRACTORS = (
    ("cabinet", "cabinets"),
    ("window", "windows"),
    ("table", "tables"),
    ("tree", "trees"),
    ("house", "houses"),
    ("door", "doors"),
    ("shelf", "shelves"),
    ("wall", "walls"),
)
_PREPS = ("near", "behind", "beside", "under", "above", "next to")
_CAPITAL_TEMPLATES = (
    "Q: What is the capital of {input}?\nA:",
    "Q: Which city is the capital of {input}?\nA:",
    "Q: What is the capital city of {input}?\nA:",
    "Q: Name the capital of {input}.\nA:",
)


def _pos_sentences(n: int, rng: np.random.Generator) -> ProbingDataset:
    texts, spans, labels = [], [], []
    for _ in range(n):
        slots = _TEMPLATES[rng.integers(len(_TEMPLATES))].split()
        words = [s if s == "." else str(rng.choice(_WORDS[s])) for s in slots]
        words[0] = words[0][0].upper() + words[0][1:]
        text, span, pos = "", [], 0
        for k, word in enumerate(words):
            gap = "" if k == 0 or word == "." else " "
            pos += len(gap)
            span.append((pos, pos + len(word)))
            text += gap + word
            pos += len(word)
        texts.append(text)
        spans.append(tuple(span))
        labels.append(tuple("PUNCT" if s == "." else _TAG.get(s, s) for s in slots))
    return ProbingDataset(
        "templated_pos",
        tuple(texts),
        tuple(labels),
        "word",
        tuple(spans),
        description=f"{n} templated sentences ({len(_TEMPLATES)} templates); UPOS tags exact by "
        "construction.",
    )


def _number_phrases(n: int, rng: np.random.Generator) -> ProbingDataset:
    texts, labels, groups = [], [], []
    for _ in range(n):
        subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
        attractor = _ATTRACTORS[rng.integers(len(_ATTRACTORS))]
        plural, plural_attractor = int(rng.integers(2)), int(rng.integers(2))
        prep = _PREPS[rng.integers(len(_PREPS))]
        texts.append(f"The {subject[plural]} {prep} the {attractor[plural_attractor]}")
        labels.append("plural" if plural else "singular")
        groups.append(subject[0])
    return ProbingDataset(
        "templated_number",
        tuple(texts),
        tuple(labels),
        "text",
        groups=tuple(groups),
        description=f"{n} phrases 'The <subject> <prep> the <attractor>'; label: the subject's "
        "number (the attractor's number is drawn independently); groups: the subject noun.",
    )


def templated_dataset(
    task: Literal["pos", "number"] = "pos", *, n: int = 400, seed: int = 0
) -> ProbingDataset:
    """Templated sentences with exact labels: word POS tags, or the subject's grammatical number.

    Args:
        task: ``"pos"`` (word level, UPOS tags) or ``"number"`` (text level, read at the last
            token, which is an attractor noun of random number).
        n: Number of sentences (at least 2).
        seed: Seed of the draw.

    Returns:
        A :class:`ProbingDataset` of ``n`` texts: for ``"pos"``, ``"templated_pos"``, word level,
        each text's labels a tuple of UPOS tags with its words' character spans; for
        ``"number"``, ``"templated_number"``, text level, labels ``"singular"`` / ``"plural"``,
        grouped by the subject noun.

    Raises:
        ValueError: ``n`` is not an int of at least 2, or an unknown ``task``.

    Example:
        >>> ds = templated_dataset("number", n=4, seed=0)
        >>> ds.texts[0], ds.labels[0]
        ('The lamps behind the door', 'plural')
    """

    seed = check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}.")
    rng = np.random.default_rng(seed)
    if task == "pos":
        return _pos_sentences(n, rng)
    if task == "number":
        return _number_phrases(n, rng)
    raise ValueError(f"templated_dataset task must be 'pos' or 'number', got {task!r}.")


def _variants(task: Task, shots: Sequence[int], templates: Sequence[str] | None) -> list[Task]:
    out: list[Task] = []
    for template in templates or [task.template]:
        base = Task.from_dict(task.to_dict() | {"template": template})
        out.extend(base.with_shots(k) for k in shots)
    return out


def country_dataset(
    task: str | Task = "capitals",
    *,
    target: Literal["country", "is_capital"] = "country",
    n_countries: int = 30,
    shots: Sequence[int] = (0, 1, 3),
    templates: Sequence[str] | None = None,
    contrast: str | Task = "past_tense",
    seed: int = 0,
) -> ProbingDataset:
    """Relational-task prompts labelled by country, or by whether the answer is a capital city.

    ``target="country"``: ``n_countries`` items of ``task`` drawn with ``seed``, each rendered with
    every template x shot count (the capitals task uses four question phrasings by default), labelled
    (and grouped) by the item's argument, e.g. ``"Netherlands"``. ``target="is_capital"``: prompts
    of ``task`` (label 1) and of ``contrast`` (label 0), the same number of items of each, rendered
    with each shot count in their own templates; groups are the items' inputs.

    Args:
        task: The capitals task (a name or a :class:`Task`).
        target: ``"country"`` or ``"is_capital"``.
        n_countries: Items drawn from ``task`` (and from ``contrast`` for ``is_capital``).
        shots: Shot counts to render each item with.
        templates: Templates for ``target="country"`` (default: four capital-question phrasings for
            the capitals task, the task's own template otherwise).
        contrast: The task whose answers are not capitals (``is_capital`` only).
        seed: Seed of the item draw.

    Returns:
        A text-level :class:`ProbingDataset`: for ``"country"``, ``n_countries`` items x
        templates x ``shots`` prompts labelled and grouped by the country; for
        ``"is_capital"``, the prompts of both tasks (``min(n_countries, len(contrast))`` items
        each, x ``shots``) labelled 1 / 0 and grouped by the items' inputs.

    Raises:
        ValueError: ``n_countries`` outside ``[2, len(task)]``, or an unknown ``target``.

    Example:
        >>> ds = country_dataset(n_countries=3, shots=(0,))
        >>> len(ds), ds.texts[0]
        (12, 'Q: What is the capital of Malaysia?\\nA:')
    """

    seed = check_seed(seed)
    base = load_task(task) if isinstance(task, str) else task
    if not 2 <= n_countries <= len(base):
        raise ValueError(
            f"n_countries must be between 2 and {len(base)} (items of {base.name!r}), got "
            f"{n_countries}."
        )
    if target == "country":
        chosen = base.subset(n_countries, seed=seed)
        if templates is None and base.template == _CAPITAL_TEMPLATES[0]:
            templates = _CAPITAL_TEMPLATES
        texts: list[str] = []
        labels: list[str] = []
        for variant in _variants(chosen, shots, templates):
            texts.extend(variant.prompts())
            labels.extend(item.argument for item in variant.items)
        description = (
            f"{n_countries} items of {base.name!r} x {len(texts) // n_countries} prompt variants; "
            "label: the country the prompt asks about."
        )
        return ProbingDataset(
            "country", tuple(texts), tuple(labels), groups=tuple(labels), description=description
        )
    if target != "is_capital":
        raise ValueError(f"target must be 'country' or 'is_capital', got {target!r}.")
    other = load_task(contrast) if isinstance(contrast, str) else contrast
    n = min(n_countries, len(other))
    prompts: list[str] = []
    flags: list[int] = []
    inputs: list[str] = []
    for flag, source in ((1, base.subset(n, seed=seed)), (0, other.subset(n, seed=seed))):
        for variant in _variants(source, shots, None):
            prompts.extend(variant.prompts())
            flags.extend([flag] * len(variant))
            inputs.extend(variant.inputs())
    return ProbingDataset(
        "is_capital",
        tuple(prompts),
        tuple(flags),
        groups=tuple(inputs),
        description=f"{n} items of {base.name!r} (label 1: the answer is a capital) and {n} of "
        f"{other.name!r} (label 0), each with {len(shots)} shot counts.",
    )
