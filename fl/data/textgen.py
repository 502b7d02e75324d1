"""A generated text corpus: topic classification (``textgen``) and causal LM (``textgen_lm``).

Each sentence fills a random template with a name, a time phrase, filler adjectives and
``keywords`` topic words. All but (with probability ``distractor``) one topic word come
from the sentence's own topic; the odd one comes from another topic, so the label is the
majority topic of the content words, not a single-token lookup. Everything is deterministic
in ``seed`` and built offline, including the word-level tokenizer (trained on the generated
corpus); ``tokenizer = "minilm"`` (or a folder) tokenises with a pretrained model's own instead.

How fast it is learnt (``benchmarks/bench_text_learning.py``, central, batch 10, 500 test
sentences; 2026-12-02): a randomly initialised tiny BERT with SGD (lr 0.1 or 1.0) stays at chance
(0.25) after 300 steps and with Adam 3e-3 reaches 0.75. The pretrained MiniLM
(``model.pretrained = "minilm"``) federated, dropout off, FedSGD over 10 clients at SGD lr 0.03:
0.98 after 30 rounds (the flagship's text arm); centrally with its dropout 0.1 at the same step the
new head sits at an edge (chance after 30 steps with torch seed 0; 0.94 after 20 in an unseeded run).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fl.data.base import DATASETS, DataError, LoadedData, load_tokenizer, text_data, word_tokenizer

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": (
        "football", "goal", "referee", "stadium", "match", "coach", "league", "striker", "tennis", "racket",
        "marathon", "medal", "team", "score", "penalty", "season", "champion", "tournament", "pitch", "athlete",
    ),
    "weather": (
        "rain", "storm", "cloud", "sunshine", "forecast", "thunder", "snow", "wind", "humidity", "frost",
        "drizzle", "hail", "temperature", "breeze", "fog", "heatwave", "umbrella", "lightning", "sky", "monsoon",
    ),
    "food": (
        "pasta", "bread", "cheese", "soup", "recipe", "oven", "salad", "butter", "garlic", "dessert",
        "kitchen", "chef", "spice", "noodles", "bakery", "tomato", "pepper", "dinner", "sauce", "omelette",
    ),
    "tech": (
        "laptop", "software", "server", "compiler", "network", "keyboard", "database", "robot", "browser", "chip",
        "algorithm", "cloudware", "router", "firmware", "startup", "battery", "screen", "kernel", "app", "processor",
    ),
}
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar")
TIMES = ("today", "yesterday", "this morning", "last night", "on monday", "at noon", "every week", "since june")
ADJS = ("new", "old", "big", "small", "strange", "great", "quiet", "busy", "famous", "cheap", "bright", "odd")
TEMPLATES = (
    "{n} talked about the {a} {k} and the {k} {t}",
    "{t} the {k} was {a} , said {n} , because of the {k}",
    "{n} saw a {a} {k} near the {k} and a {k}",
    "the {k} and the {a} {k} worried {n} {t}",
    "{n} wrote a note on the {k} , the {k} and the {a} {k}",
    "{t} {n} asked whether the {k} beat the {a} {k}",
)


@lru_cache(maxsize=8)
def generate_corpus(n_samples: int, seed: int, keywords: int, distractor: float) -> tuple[tuple[str, ...], np.ndarray]:
    """(sentences, labels [N]) -- the same for the same arguments, on every machine."""
    rng = np.random.default_rng(seed)
    topic_words = list(TOPICS.values())
    n_topics = len(topic_words)
    texts: list[str] = []
    labels = rng.integers(n_topics, size=n_samples)
    for y in labels:
        tpl = TEMPLATES[rng.integers(len(TEMPLATES))]
        n_slots = tpl.count("{k}")
        words = [str(rng.choice(topic_words[y])) for _ in range(max(keywords, n_slots))]
        if rng.random() < distractor and len(words) >= 3:
            other = (y + 1 + rng.integers(n_topics - 1)) % n_topics
            words[rng.integers(len(words))] = str(rng.choice(topic_words[other]))
        rng.shuffle(words)
        extra = words[n_slots:]  # more keywords than the template has slots: append them
        text = tpl
        for w in words[:n_slots]:
            text = text.replace("{k}", w, 1)
        text = text.replace("{n}", str(rng.choice(NAMES))).replace("{t}", str(rng.choice(TIMES)))
        text = text.replace("{a}", str(rng.choice(ADJS)))
        if extra:
            text += " , also " + " and ".join(extra)
        texts.append(text)
    return tuple(texts), labels.astype(np.int64)


def _generated(
    n_samples: int, seq_len: int, seed: int, keywords: int, distractor: float, kind: str, tokenizer: str
) -> LoadedData:
    if n_samples < 8:
        raise DataError(f"textgen: n_samples must be >= 8, got {n_samples}")
    if not 0 <= distractor < 1:
        raise DataError(f"textgen: distractor must be in [0, 1), got {distractor}")
    if keywords < 3:
        raise DataError(f"textgen: keywords must be >= 3 (so the majority topic is defined), got {keywords}")
    texts, labels = generate_corpus(n_samples, seed, keywords, distractor)
    # the word-level tokenizer trained on the corpus, or a pretrained model's own (its folder or name, e.g. "minilm")
    tok = load_tokenizer(tokenizer) if tokenizer else word_tokenizer(texts)
    name = "textgen" if kind == "text" else "textgen_lm"
    return text_data(texts, labels, tok, seq_len, kind, list(TOPICS), name)  # type: ignore[arg-type]


@DATASETS.register("textgen")
def textgen(
    n_samples: int = 5000, seq_len: int = 24, seed: int = 0, keywords: int = 3, distractor: float = 0.3,
    tokenizer: str = "",
) -> LoadedData:
    """generated 4-topic sentence classification, offline word-level tokenizer; params: n_samples, seq_len, seed,
    tokenizer (a pretrained model's folder or name, e.g. "minilm", instead of the word-level one)."""
    return _generated(n_samples, seq_len, seed, keywords, distractor, "text", tokenizer)


@DATASETS.register("textgen_lm")
def textgen_lm(
    n_samples: int = 5000, seq_len: int = 24, seed: int = 0, keywords: int = 3, distractor: float = 0.3,
    tokenizer: str = "",
) -> LoadedData:
    """the textgen corpus as a causal-LM task (labels = input_ids, -100 on padding); params as textgen."""
    return _generated(n_samples, seq_len, seed, keywords, distractor, "lm", tokenizer)
