"""The built-in corpus: short documents from five domains of different structure, made on the fly.

It needs no download, is infinite and random-access (document i is a pure function of the seed
and i), and each domain exercises a different skill, so per-domain loss shows what a small model
has learnt after a few hundred steps:

  arithmetic   "47+385=432, 9*8=72"               carries, a little multiplication
  copy         "copy: kqzvte | kqzvte"             copy a random string (induction)
  reverse      "reverse: kqzvt | tvzqk"            reverse it (harder: position arithmetic)
  sentences    "the small cats see a red bird ."   a template grammar with number agreement
  kv_recall    "c:4 a:9 x:1 ; a ? 9"               look a key up in the context

Documents are 20 to 120 characters, so a byte-level row of a few hundred tokens packs several.
The answer of each algorithmic domain follows its last "=", "| " or "? " separator.
"""
import string
from typing import Callable, Sequence

import gin
import numpy as np

from glam.data.document import Document

DOMAINS = ("arithmetic", "copy", "reverse", "sentences", "kv_recall")
MIN_CHARS = 20
LETTERS = np.array(list(string.ascii_lowercase))


def _number(rng: np.random.Generator, max_digits: int) -> int:
  """A number whose digit count is uniform in 1..max_digits, so short and long numbers mix."""
  digits = int(rng.integers(1, max_digits + 1))
  return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))


def _equation(rng: np.random.Generator) -> str:
  op = "+-*"[int(rng.integers(3))]
  if op == "*":
    a, b = _number(rng, 2), _number(rng, 1)
    return f"{a}*{b}={a * b}"
  a, b = _number(rng, 3), _number(rng, 3)
  if op == "-":
    a, b = max(a, b), min(a, b)  # non-negative results: one rule fewer to learn
    return f"{a}-{b}={a - b}"
  return f"{a}+{b}={a + b}"


def arithmetic(rng: np.random.Generator) -> str:
  """2-4 equations (at most 54 characters), more while shorter than MIN_CHARS."""
  equations = [_equation(rng) for _ in range(int(rng.integers(2, 5)))]
  while len(", ".join(equations)) < MIN_CHARS:
    equations.append(_equation(rng))
  return ", ".join(equations)


def _letters(rng: np.random.Generator, low: int, high: int) -> str:
  return "".join(LETTERS[rng.integers(0, 26, size=int(rng.integers(low, high + 1)))])


def copy(rng: np.random.Generator) -> str:
  """6-24 random letters, then the same letters: 21 to 57 characters."""
  word = _letters(rng, 6, 24)
  return f"copy: {word} | {word}"


def reverse(rng: np.random.Generator) -> str:
  """5-20 random letters, then reversed: 22 to 52 characters."""
  word = _letters(rng, 5, 20)
  return f"reverse: {word} | {word[::-1]}"


def kv_recall(rng: np.random.Generator) -> str:
  """4-10 pairs of distinct letter keys and digit values, then a query of one key and its value:
  23 to 47 characters. ":" rather than "=" binds a value, so the answer is never after an "="."""
  count = int(rng.integers(4, 11))
  keys = LETTERS[rng.permutation(26)[:count]]
  values = rng.integers(0, 10, size=count)
  query = int(rng.integers(count))
  pairs = " ".join(f"{k}:{v}" for k, v in zip(keys, values))
  return f"{pairs} ; {keys[query]} ? {values[query]}"


# The grammar: (singular, plural) forms, so that subject and verb must agree in number.
DETERMINERS = (("the", "the"), ("a", "some"), ("this", "these"), ("one", "two"), ("every", "many"))
ADJECTIVES = ("small", "big", "red", "old", "young", "quiet", "happy", "green", "tall", "lazy")
NOUNS = (("cat", "cats"), ("dog", "dogs"), ("bird", "birds"), ("fox", "foxes"),
         ("child", "children"), ("farmer", "farmers"), ("horse", "horses"), ("fish", "fish"),
         ("mouse", "mice"), ("king", "kings"))
TRANSITIVE = (("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"),
              ("follows", "follow"), ("watches", "watch"))
INTRANSITIVE = (("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"),
                ("jumps", "jump"))
ADVERBS = ("quickly", "slowly", "loudly", "quietly", "today", "again")
CONJUNCTIONS = ("and", "but", "because", "while")


def _pick(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _noun_phrase(rng: np.random.Generator, plural: int) -> str:
  words = [_pick(rng, DETERMINERS)[plural]]
  if rng.random() < 0.5:
    words.append(_pick(rng, ADJECTIVES))
  words.append(_pick(rng, NOUNS)[plural])
  return " ".join(words)


def _clause(rng: np.random.Generator) -> str:
  plural = int(rng.integers(2))
  subject = _noun_phrase(rng, plural)
  if rng.random() < 0.6:
    return f"{subject} {_pick(rng, TRANSITIVE)[plural]} {_noun_phrase(rng, int(rng.integers(2)))}"
  verb = _pick(rng, INTRANSITIVE)[plural]
  return f"{subject} {verb} {_pick(rng, ADVERBS)}" if rng.random() < 0.5 else f"{subject} {verb}"


def sentences(rng: np.random.Generator) -> str:
  """One or two clauses ending in " ."; a second one whenever the first is under MIN_CHARS.
  The longest possible document is 107 characters."""
  text = _clause(rng)
  if len(text) < MIN_CHARS or rng.random() < 0.4:
    text = f"{text} {_pick(rng, CONJUNCTIONS)} {_clause(rng)}"
  return f"{text} ."


GENERATORS: dict[str, Callable[[np.random.Generator], str]] = {
    "arithmetic": arithmetic, "copy": copy, "reverse": reverse,
    "sentences": sentences, "kv_recall": kv_recall}


@gin.configurable
class SyntheticCorpus:
  """An infinite, random-access source over the domains above.

  Args:
    seed: which corpus (default 0); document i of a seed never changes, another seed gives other
      documents (the trainer holds out seed + 1_000_003 for evaluation). Must be >= 0.
    domains: the domains to draw from, uniformly (default: all five, `DOMAINS`).
  """
  num_documents = None  # infinite: any index >= 0

  def __init__(self, seed: int = 0, domains: Sequence[str] = DOMAINS):
    if isinstance(domains, str):
      domains = (domains,)
    unknown = [d for d in domains if d not in GENERATORS]
    if unknown or not domains:
      raise ValueError(f"SyntheticCorpus: unknown domain(s) {unknown or 'none given'}; "
                       f"valid domains: {', '.join(DOMAINS)}")
    if len(set(domains)) != len(domains):
      raise ValueError(f"SyntheticCorpus: domains {list(domains)} repeat a name")
    if seed < 0:
      raise ValueError(f"SyntheticCorpus: seed={seed}, expected a non-negative integer")
    self.seed = int(seed)
    self.domain_names = tuple(domains)

  def document(self, index: int) -> Document:
    if index < 0:
      raise IndexError(f"SyntheticCorpus.document({index}): index must be >= 0")
    # One generator per (seed, index): documents are independent of the order they are read in.
    rng = np.random.default_rng([self.seed, int(index)])
    domain = self.domain_names[int(rng.integers(len(self.domain_names)))]
    return Document(GENERATORS[domain](rng), domain)

  def __repr__(self) -> str:
    return f"SyntheticCorpus(seed={self.seed}, domains={self.domain_names})"


# Where each domain's answer starts: after the last occurrence of the separator. A sentence's
# "answer" is its last word and the final " .", a grammar cloze.
ANSWER_SEPARATORS = {"arithmetic": "=", "copy": "| ", "reverse": "| ", "kv_recall": "? "}


def split_example(text: str, domain: str) -> tuple[str, str]:
  """A document as a (question, answer) pair, for instruction tuning on the built-in corpus:
  "12+30=42, 7*8=56" -> ("12+30=42, 7*8=", "56"); "copy: abc | abc" -> ("copy: abc | ", "abc")."""
  separator = ANSWER_SEPARATORS.get(domain)
  if separator is None:
    question, _, last = text[:-2].rpartition(" ")  # text ends with " ."
    return question + " ", last + " ."
  question, separator, answer = text.rpartition(separator)
  return question + separator, answer
