"""Needle in a haystack: deterministic key–value retrieval prompts from the pydoc corpus.

A case hides one fact, ``"The special magic number for <key> is <value>."`` (``key`` a
random word, ``value`` a random ``digits``-digit number), in a haystack of Python's
pydoc text (``models.perplexity.corpus_text()``, shipped with CPython) at a *depth*
(0 = the first sentence, 1 = just before the question), and ends with a question in
completion form whose answer is the value. Prompts are exactly ``context_len`` tokens.

* The haystack is a random stretch of the tokenized corpus; the needle goes in at the
  sentence boundary nearest to ``depth · len(haystack)``.
* Pieces are tokenized separately and concatenated (prefix, haystack, needle, haystack,
  question), so ``needle_span`` is exact by construction: ``prompt_ids[a:b] ==
  answer_ids`` for ``(a, b) = needle_span``. ``answer_ids`` is the tokenization of
  ``" " + value`` (with SmolLM2's tokenizer: the space token, then one token per digit).
* ``NeedleCase.score(generated_ids)``: exact match — the generation starts with
  ``answer_ids`` and the number does not go on (the next token does not start with a
  digit). Greedy decoding is correct exactly when, teacher-forced on ``prompt +
  answer``, the argmax at each answer step is the answer token and the step after is not
  a digit (``teacher_forced_correct``); the analysis uses that (one forward pass).
* Formats (``FORMATS``): ``"plain"`` (text, then the question and the answer's start),
  ``"qa"`` (Question:/Answer: lines) and ``"chat"`` (the checkpoint's chat template, the
  haystack in the user turn, the answer's start prefilled in the assistant turn).
  ``DEFAULT_FORMAT`` is the one with the best full-model accuracy on SmolLM2-135M at 1k
  tokens (docs/analysis.md has the calibration).

The same seed gives the same cases; needle ``i`` (key, value, haystack stretch) is shared
by all depths, so depths are compared on identical facts.

Example (any tokenizer with ``encode`` / ``decode``; a character-level toy here):
  >>> from models.analysis.needle import make_cases, CharTokenizer
  >>> cases = make_cases(CharTokenizer(), context_len=300, depths=(0.0, 1.0), n=2, seed=0)
  >>> len(cases), len(cases[0].prompt_ids)
  (4, 300)
  >>> a, b = cases[0].needle_span
  >>> cases[0].prompt_ids[a:b] == cases[0].answer_ids, cases[0].score(cases[0].answer_ids + (9,))
  (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from attn.errors import UserError

FORMATS = ("plain", "qa", "chat")
DEFAULT_FORMAT = "chat"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

# Keys: common, concrete English nouns (a fixed list, so cases need no download).
WORDS = tuple("""
apple anchor badger banana barrel basket beacon beetle bicycle blanket bottle bridge bucket
butter cabbage camera candle canyon carpet castle cherry chimney cobra compass copper cotton
crayon dagger desert diamond dolphin donkey dragon eagle falcon feather ferret fiddle forest
fountain garden garlic giraffe glacier goblin granite guitar hammer harbor helmet hornet
iceberg island jacket jaguar kettle kitten ladder lantern lemon leopard lizard lobster magnet
mango marble meadow mirror monkey mountain mushroom needle oyster paddle panther parrot
peanut pebble pelican pepper pigeon pillow pirate planet pocket pumpkin puppet rabbit raven
ribbon river rocket saddle salmon satchel scarf shovel spider sponge squirrel statue
sunflower teapot thunder tiger tomato trumpet tulip turtle umbrella valley velvet violin
volcano walnut walrus whistle window wizard zebra
""".split())


class CharTokenizer:
    """A character-level toy tokenizer (id = ``ord(c) % 128``) for doctests and tests.

    Example:
      >>> t = CharTokenizer(); t.decode(t.encode("ab 12"))
      'ab 12'
    """

    vocab_size = 128
    eos_ids = (0,)

    def encode(self, text: str, **_) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids: Sequence[int], **_) -> str:
        return "".join(chr(int(i)) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **_) -> str:
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        return text + ("<assistant>\n" if add_generation_prompt else "")


@dataclasses.dataclass(frozen=True)
class NeedleCase:
    """One prompt with a hidden fact.

    Attributes:
      prompt_ids: ``[P]`` token ids, ``P == context_len``.
      answer_ids: the tokens of ``" " + value`` (what a correct model generates first).
      needle_span: ``(start, end)``: ``prompt_ids[start:end] == answer_ids``.
      key, value: the fact's word and number (strings). depth: fraction of the haystack
        before the needle. context_len: P. fmt: the prompt format. index: the needle
        number (shared by all depths of one needle).
      digit_ids: ids whose text starts with a digit (a generation that continues with
        one has not stopped at the value).
    """

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    needle_span: tuple[int, int]
    key: str
    value: str
    depth: float
    context_len: int
    fmt: str
    index: int
    digit_ids: frozenset = frozenset()

    def score(self, generated_ids: Sequence[int]) -> bool:
        """Exact match: the generation starts with ``answer_ids`` and does not continue
        the number (it may stop right there, or go on with ``.``, EOS, text).

        Example:
          >>> c = NeedleCase((1, 5, 6), (5, 6), (1, 3), "k", "56", 0.0, 3, "plain", 0, frozenset({5, 6}))
          >>> c.score([5, 6]), c.score([5, 6, 2]), c.score([5, 6, 6]), c.score([5])
          (True, True, False, False)
        """
        g = [int(t) for t in generated_ids]
        A = len(self.answer_ids)
        if g[:A] != list(self.answer_ids):
            return False
        return len(g) == A or g[A] not in self.digit_ids


def teacher_forced_correct(argmax_R, case: NeedleCase) -> bool:
    """Greedy correctness from one teacher-forced pass over ``prompt + answer_ids``.

    ``argmax_R [A + 1]``: the argmax token at the rows ``P - 1 .. P + A - 1`` (the rows
    that predict each answer token and the token after the answer). Equal to
    ``case.score(greedy_generation)`` whenever greedy decoding agrees with the full pass.

    Example:
      >>> c = NeedleCase((1, 5, 6), (5, 6), (1, 3), "k", "56", 0.0, 3, "plain", 0, frozenset({5, 6}))
      >>> teacher_forced_correct([5, 6, 0], c), teacher_forced_correct([5, 6, 5], c)
      (True, False)
    """
    return case.score([int(t) for t in argmax_R])


# --------------------------------------------------------------------------- building
@functools.lru_cache(maxsize=4)
def _corpus_tokens(tokenizer) -> np.ndarray:
    """The pydoc corpus tokenized once per tokenizer (int32)."""
    from models.perplexity import corpus_text

    return np.asarray(tokenizer.encode(corpus_text()), np.int32)


@functools.lru_cache(maxsize=4)
def _token_classes(tokenizer, vocab: int) -> tuple[np.ndarray, frozenset]:
    """(bool ``[vocab]`` "a sentence or line ends after this token", ids starting with a digit)."""
    ends = np.zeros(vocab, bool)
    digits = set()
    for i in range(vocab):
        s = tokenizer.decode([i])
        ends[i] = s.rstrip(" ").endswith((".", "\n")) and s.strip() in ("", ".")
        if s[:1].isdigit():
            digits.add(i)
    return ends, frozenset(digits)


def _format_pieces(tokenizer, fmt: str, key: str) -> tuple[list[int], list[int]]:
    """Token ids before the haystack and after it (question + the answer's start)."""
    question = f"What is the special magic number for {key}?"
    lead = f"The special magic number for {key} is"
    if fmt == "plain":
        return [], tokenizer.encode(f"\n\n{question} {lead}")
    if fmt == "qa":
        return [], tokenizer.encode(f"\n\nQuestion: {question}\nAnswer: {lead}")
    if fmt == "chat":
        sentinel = "\x00HAYSTACK\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentinel + f"\n\n{question}"}],
                                             add_generation_prompt=True)
        before, after = text.split(sentinel)
        return tokenizer.encode(before), tokenizer.encode(after + lead)
    raise UserError(f"needle format {fmt!r}: must be one of {FORMATS}")


def make_cases(tokenizer, *, context_len: int, depths: Sequence[float] = DEFAULT_DEPTHS, n: int = 8,
               seed: int = 0, fmt: str = DEFAULT_FORMAT, digits: int = 7,
               corpus_ids: Sequence[int] | None = None) -> list[NeedleCase]:
    """``n`` needles × ``len(depths)`` cases of exactly ``context_len`` tokens.

    Args:
      tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> text`` (``apply_chat_template``
        for ``fmt="chat"``); ``vocab_size`` if it has one.
      context_len: prompt length P in tokens (SmolLM2: at most 8192).
      depths: fractions in [0, 1] of the haystack placed before the needle.
      n: needles (each used at every depth). seed: everything random comes from it.
      fmt: ``"plain"``, ``"qa"`` or ``"chat"``. digits: length of the value (>= 2).
      corpus_ids: haystack token stream (default: the tokenized pydoc corpus).

    Returns:
      ``[NeedleCase]`` ordered needle-major: ``cases[i * len(depths) + j]`` is needle i at
      ``depths[j]``.

    Example:
      >>> cs = make_cases(CharTokenizer(), context_len=200, depths=(0.5,), n=3, seed=1)
      >>> [c.depth for c in cs], cs[0] == make_cases(CharTokenizer(), context_len=200,
      ...                                           depths=(0.5,), n=3, seed=1)[0]
      ([0.5, 0.5, 0.5], True)
    """
    if not (isinstance(context_len, int) and context_len > 0):
        raise UserError(f"make_cases: context_len={context_len!r} must be a positive int")
    if not (isinstance(n, int) and n >= 1):
        raise UserError(f"make_cases: n={n!r} must be a positive int")
    if not (isinstance(digits, int) and digits >= 2):
        raise UserError(f"make_cases: digits={digits!r} must be an int >= 2")
    bad = [d for d in depths if not 0.0 <= float(d) <= 1.0]
    if bad or not len(depths):
        raise UserError(f"make_cases: depths must be fractions in [0, 1], got {list(depths)!r}")
    if fmt not in FORMATS:
        raise UserError(f"make_cases: fmt={fmt!r} must be one of {FORMATS}")
    hay_all = np.asarray(_corpus_tokens(tokenizer) if corpus_ids is None else corpus_ids, np.int32)
    vocab = int(getattr(tokenizer, "vocab_size", 0) or (int(hay_all.max()) + 1))
    ends, digit_ids = _token_classes(tokenizer, vocab)
    starts_all = np.flatnonzero(ends[np.clip(hay_all, 0, vocab - 1)]) + 1
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        key = str(rng.choice(WORDS))
        value = str(rng.integers(1, 10)) + "".join(str(d) for d in rng.integers(0, 10, digits - 1))
        before, after = _format_pieces(tokenizer, fmt, key)
        pre = tokenizer.encode(f" The special magic number for {key} is")
        val = tokenizer.encode(" " + value)
        post = tokenizer.encode(".")
        H = context_len - len(before) - len(after) - len(pre) - len(val) - len(post)
        if H < 1:
            raise UserError(f"make_cases: context_len={context_len} leaves no room for a haystack "
                            f"(needle and question take {context_len - H} tokens)")
        if H > len(hay_all):
            raise UserError(f"make_cases: context_len={context_len} needs {H} haystack tokens, "
                            f"the corpus has {len(hay_all)}")
        start = int(rng.integers(0, len(hay_all) - H + 1))
        # Begin at a sentence start when one is near (the stretch must still fit).
        nxt = np.searchsorted(starts_all, start)
        if nxt < len(starts_all) and starts_all[nxt] <= len(hay_all) - H:
            start = int(starts_all[nxt])
        hay = hay_all[start:start + H]
        cuts = np.concatenate([[0], np.flatnonzero(ends[np.clip(hay, 0, vocab - 1)]) + 1, [H]])
        for depth in depths:
            target = float(depth) * H
            cut = int(cuts[np.argmin(np.abs(cuts - target))])  # nearest sentence boundary
            prompt = before + hay[:cut].tolist() + pre + val + post + hay[cut:].tolist() + after
            a = len(before) + cut + len(pre)
            cases.append(NeedleCase(
                prompt_ids=tuple(int(t) for t in prompt), answer_ids=tuple(val), needle_span=(a, a + len(val)),
                key=key, value=value, depth=float(depth), context_len=context_len, fmt=fmt,
                index=i, digit_ids=digit_ids))
    return cases


def with_value(case: NeedleCase, tokenizer, value: str) -> NeedleCase:
    """The same prompt with another value of the same token length (activation patching
    needs aligned runs).

    Example:
      >>> t = CharTokenizer()
      >>> c = make_cases(t, context_len=250, depths=(0.5,), n=1, seed=0)[0]
      >>> d = with_value(c, t, "9" * len(c.value))
      >>> len(d.prompt_ids) == len(c.prompt_ids), t.decode(d.answer_ids)
      (True, ' 9999999')
    """
    val = tuple(tokenizer.encode(" " + value))
    a, b = case.needle_span
    if len(val) != b - a:
        raise UserError(f"with_value: {value!r} has {len(val)} tokens, the needle has {b - a}")
    prompt = case.prompt_ids[:a] + val + case.prompt_ids[b:]
    return dataclasses.replace(case, prompt_ids=prompt, answer_ids=val, value=value)


def other_value(value: str, rng: np.random.Generator) -> str:
    """A number of the same length that differs from ``value`` in every digit.

    Example:
      >>> v = other_value("1234567", np.random.default_rng(0))
      >>> len(v), any(a == b for a, b in zip(v, "1234567")), v[0] != "0"
      (7, False, True)
    """
    out = []
    for i, d in enumerate(value):
        choices = [c for c in "0123456789" if c != d and not (i == 0 and c == "0")]
        out.append(str(rng.choice(choices)))
    return "".join(out)
