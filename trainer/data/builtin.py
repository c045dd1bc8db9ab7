"""Builtin data sets, `builtin:<name>`: built at run time into the cache as JSON Lines,
from a deterministic generator or from text that PyPI packages ship (never committed).

- toy-chat (chat): generated question/answer pairs (arithmetic, word reversal, capitals,
  counting, spelling) that a tiny model learns within a minute.
- chatterbot (chat): the English conversations of `chatterbot-corpus`.
- chatterbot-pairs (preference): each chatterbot question (once) with its first answer as the
  chosen one and the answer of another conversation (seeded) as the rejected one: a preference for
  answers that answer the question.
- gensim-lee (text): the Lee news corpus from gensim's test data.
- gensim-wiki (text): the Wikipedia article extract from gensim's test data.
- lee-cloze (choice): a HellaSwag-style cloze from gensim's `lee.cor` (50 news stories, none
  of them in `lee_background.cor`, which gensim-lee trains on): the true next sentence of a
  story among four, the other three from other stories; an evaluation benchmark only.
- polarity (classification): Pang & Lee sentence polarity from gensim's test data, labels neg/pos.
- newsgroups (classification): gensim's mini 20-newsgroups sample (alt.atheism vs sci.space),
  message bodies without headers, labels the group names.
"""

from __future__ import annotations

import bz2
import copyreg
import io
import json
import os
import pickle
import random
import re
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import yaml

PREFIX = "builtin:"


def _toy_chat() -> Iterator[dict]:
    rng = random.Random(1234)
    words = ("red green blue cat dog bird fish tree river stone cloud sun moon star apple bread "
             "house road lamp book ship wind rain snow fire sand gold milk leaf rock").split()
    capitals = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
                "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa", "Chile": "Santiago",
                "Norway": "Oslo", "Greece": "Athens", "Cuba": "Havana", "Poland": "Warsaw", "India": "New Delhi",
                "China": "Beijing", "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon", "Mexico": "Mexico City"}

    def arithmetic():
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."

    def reversal():
        chosen = [rng.choice(words) for _ in range(rng.randint(2, 7))]
        return "Reverse the words: " + " ".join(chosen), " ".join(reversed(chosen))

    def capital():
        country = rng.choice(sorted(capitals))
        return f"What is the capital of {country}?", f"The capital of {country} is {capitals[country]}."

    def counting():
        start = rng.randint(0, 20)
        end = start + rng.randint(2, 8)
        return f"Count from {start} to {end}.", " ".join(str(i) for i in range(start, end + 1))

    def spelling():
        word = rng.choice(words)
        return f"Spell the word {word}.", " ".join(word)

    tasks = (arithmetic, reversal, capital, counting, spelling)
    for i in range(2000):
        question, answer = tasks[i % len(tasks)]()
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if i % 10 == 9:  # some two-turn conversations
            question2, answer2 = tasks[(i + 1) % len(tasks)]()
            messages += [{"role": "user", "content": question2}, {"role": "assistant", "content": answer2}]
        yield {"messages": messages}


def _package_dir(module: str, pip_name: str) -> Path:
    try:
        imported = __import__(module)
    except ImportError:
        raise ValueError(f"this builtin data set needs `pip install {pip_name}`") from None
    return Path(imported.__file__).parent


def _gensim_test_data() -> Path:
    return _package_dir("gensim", "gensim") / "test" / "test_data"


def _chatterbot() -> Iterator[dict]:
    folder = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            turns = turns[: len(turns) // 2 * 2]  # end on an answer
            roles = ("user", "assistant") * (len(turns) // 2)
            yield {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]}


def _chatterbot_pairs() -> Iterator[dict]:
    # the first answer to each question (the corpus asks some questions a hundred times)
    answers = {}
    for conversation in _chatterbot():
        answers.setdefault(conversation["messages"][0]["content"], conversation["messages"][1]["content"])
    exchanges = list(answers.items())
    rng = random.Random(2026)
    for question, answer in exchanges:
        rejected = answer
        while rejected.strip().lower() == answer.strip().lower():
            rejected = rng.choice(exchanges)[1]
        yield {"prompt": question, "chosen": answer, "rejected": rejected}


def _gensim_lee() -> Iterator[dict]:
    for line in (_gensim_test_data() / "lee_background.cor").read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield {"text": line.strip()}


def _gensim_wiki() -> Iterator[dict]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = _gensim_test_data() / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(dump) as f:
        for _title, markup, _page in extract_pages(f, filter_namespaces=("0",)):
            if markup.lower().lstrip().startswith("#redirect"):
                continue
            text = re.sub(r"'{2,}", "", filter_wiki(markup))
            text = re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()
            if len(text) > 200:
                yield {"text": text}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 1]


def _lee_cloze() -> Iterator[dict]:
    """For each story of lee.cor and each of its sentences after the first: the context is up
    to the two sentences before it, the choices the sentence itself and three sentences of
    other stories (seeded), in a seeded order."""
    # Windows-1252 (its pound sign is byte 0xa3); the 50 stories share no sentence with lee_background.cor
    lines = (_gensim_test_data() / "lee.cor").read_bytes().decode("cp1252").splitlines()
    stories = [_sentences(line) for line in lines if line.strip()]
    rng = random.Random(2024)
    for number, story in enumerate(stories):
        others = [s for k, other in enumerate(stories) if k != number for s in other]
        for k in range(1, len(story)):
            choices = [story[k]] + rng.sample([s for s in others if s != story[k]], 3)
            order = list(range(4))
            rng.shuffle(order)
            yield {"context": " ".join(story[max(0, k - 2):k]), "choices": [choices[i] for i in order],
                   "answer": order.index(0), "story": number}


def _polarity() -> Iterator[dict]:
    # The file is Windows-1252 (its dashes are byte 0x97).
    for line in (_gensim_test_data() / "pang_lee_polarity.cor").read_bytes().decode("cp1252").splitlines():
        label, _, text = line.partition(" ")
        if label.startswith("__label__") and text.strip():
            yield {"text": text.strip(), "label": label.removeprefix("__label__")}


class _Bunch(dict):
    """scikit-learn's Bunch, as the pickled sample stores it."""


_NEWSGROUP_PICKLE_CLASSES = {
    ("copy_reg", "_reconstructor"): copyreg._reconstructor,
    ("__builtin__", "object"): object,
    ("__builtin__", "dict"): dict,
    ("sklearn.datasets.base", "Bunch"): _Bunch,
    ("numpy.core.multiarray", "_reconstruct"): (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _NewsgroupUnpickler(pickle.Unpickler):
    """Only the classes the sample is made of: a pickle can otherwise run any code."""

    def find_class(self, module, name):
        if (module, name) not in _NEWSGROUP_PICKLE_CLASSES:
            raise pickle.UnpicklingError(f"builtin:newsgroups: unexpected class {module}.{name} in the sample")
        return _NEWSGROUP_PICKLE_CLASSES[(module, name)]


def _newsgroups() -> Iterator[dict]:
    raw = zlib.decompress((_gensim_test_data() / "mini_newsgroup").read_bytes())
    bunch = _NewsgroupUnpickler(io.BytesIO(raw), encoding="latin1").load()
    names = bunch["target_names"]
    for message, target in zip(bunch["data"], bunch["target"].tolist()):
        _headers, _, body = message.partition("\n\n")  # the headers name the group
        if body.strip():
            yield {"text": body.strip(), "label": names[target]}


# name -> (format, version, rows); bump the version when a generator's output changes.
BUILTINS: dict[str, tuple[str, int, Callable[[], Iterator[dict]]]] = {
    "toy-chat": ("chat", 1, _toy_chat),
    "chatterbot": ("chat", 1, _chatterbot),
    "chatterbot-pairs": ("preference", 1, _chatterbot_pairs),
    "gensim-lee": ("text", 1, _gensim_lee),
    "gensim-wiki": ("text", 1, _gensim_wiki),
    "lee-cloze": ("choice", 1, _lee_cloze),
    "polarity": ("classification", 1, _polarity),
    "newsgroups": ("classification", 1, _newsgroups),
}


def is_builtin(path: str) -> bool:
    return path.startswith(PREFIX)


def builtin_format(path: str) -> str:
    return BUILTINS[_builtin_name(path)][0]


def _builtin_name(path: str) -> str:
    name = path.removeprefix(PREFIX)
    if name not in BUILTINS:
        raise ValueError(f"{path}: unknown builtin data set; known: {', '.join(PREFIX + k for k in BUILTINS)}")
    return name


def materialize(path: str, cache_dir: Path) -> Path:
    """The JSON Lines file of a builtin data set, written into `cache_dir` once."""
    name = _builtin_name(path)
    _fmt, version, rows = BUILTINS[name]
    target = cache_dir / "builtin" / f"{name}-v{version}.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, aside = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(aside, target)
    finally:
        if os.path.exists(aside):
            os.unlink(aside)
    return target
