"""Tokenizer + chat template for pretrained checkpoints (``tokenizers`` and ``jinja2``).

Two sources build the same ``Tokenizer``:

* GGUF metadata (``tokenizer.ggml.*``): a byte-level BPE ("gpt2" model) from the token list
  and merges. The pre-tokenizer follows llama.cpp's ``tokenizer.ggml.pre`` name (the split
  the merges were learned with; e.g. "smollm" splits digits one by one before the GPT-2
  regex). Tokens typed CONTROL (3) become special tokens, USER_DEFINED (4) added tokens,
  so that ``<|im_start|>`` stays whole.
* a Hugging Face directory: ``tokenizer.json`` as is, with ``tokenizer_config.json``
  (chat template, special tokens) and ``generation_config.json`` (end-of-sequence ids).

``apply_chat_template`` renders the Jinja template the way transformers does: a sandboxed
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` filter that keeps non-ASCII text, and ``raise_exception`` / ``strftime_now``
globals; the special tokens (``bos_token``, ``eos_token``, ...) are template variables.

Example:
  >>> from models.pretrained.tokenizer import Tokenizer
  >>> tok = Tokenizer.from_vocab(["a", "b", "ab", "<s>"], ["a b"], bos="<s>", eos=("<s>",),
  ...                            special=("<s>",),
  ...                            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
  >>> tok.encode("abab"), tok.decode([2, 3, 0])
  ([2, 2], 'aba')
  >>> tok.apply_chat_template([{"role": "user", "content": "hi"}])
  'hi'
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from models.pretrained.errors import PretrainedError

# llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) -> the split before byte-level BPE.
# GPT-2's own regex is ByteLevel(use_regex=True); the others split with their regex first.
_GPT2 = lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex):
    return lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


GGUF_PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt2": _GPT2,
    # SmolLM: digits one at a time, then GPT-2's regex (llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM,
    # and the Digits + ByteLevel pre-tokenizer of the original tokenizer.json).
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), _GPT2()]),
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
}

_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    """Encode / decode / chat template around a ``tokenizers.Tokenizer``.

    Attributes:
      bos_id: beginning-of-sequence id, or None.
      eos_ids: ids that end generation (the EOS token plus e.g. ``<|im_end|>`` when the
        checkpoint names it), a tuple.
      pad_id: padding id (falls back to the first EOS id, as the GGUF files do), or None.
      vocab_size: one more than the largest id the tokenizer can produce (added tokens
        included): the embedding rows it needs. (Not ``get_vocab_size``, which counts the
        tokens and misses a gap in the ids.)
      chat_template: the Jinja source, or None.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos: str | None, eos: Sequence[str],
                 pad: str | None = None, unk: str | None = None, chat_template: str | None = None,
                 source: str = "<memory>"):
        self.backend = backend
        self.source = source
        self.chat_template = chat_template
        ids = lambda t: None if t is None else backend.token_to_id(t)
        for name, tok in (("bos", bos), ("pad", pad), ("unk", unk), *(("eos", e) for e in eos)):
            if tok is not None and ids(tok) is None:
                raise PretrainedError(f"{source}: tokenizer: {name} token {tok!r} is not in the vocabulary")
        self.special_tokens = {f"{k}_token": v for k, v in
                               (("bos", bos), ("eos", eos[0] if eos else None), ("pad", pad), ("unk", unk))
                               if v is not None}
        self.bos_id = ids(bos)
        self.eos_ids = tuple(dict.fromkeys(ids(e) for e in eos))
        self.pad_id = ids(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else None)
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    # ----------------------------------------------------------------- builders
    @classmethod
    def from_vocab(cls, tokens: Sequence[str], merges: Sequence[str], *, bos=None, eos=(), pad=None,
                   unk=None, special: Sequence[str] = (), user_defined: Sequence[str] = (),
                   pre: str = "default", add_bos: bool = False, chat_template=None,
                   source: str = "<memory>") -> "Tokenizer":
        """Byte-level BPE from a token list (id = index) and ``"a b"`` merge strings."""
        if pre not in GGUF_PRE_TOKENIZERS:
            raise PretrainedError(f"{source}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                                  f"known: {sorted(GGUF_PRE_TOKENIZERS)}")
        vocab = {t: i for i, t in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise PretrainedError(f"{source}: tokenizer: the token list has duplicates")
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=False,
                                                  byte_fallback=False))
        backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        # Special tokens are matched whole in the text before BPE (as llama.cpp does).
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
        if add_bos and bos is not None:
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        return cls(backend, bos=bos, eos=eos, pad=pad, unk=unk, chat_template=chat_template, source=source)

    @classmethod
    def from_gguf_fields(cls, fields: dict, source: str) -> "Tokenizer":
        """From the ``tokenizer.ggml.*`` / ``tokenizer.chat_template`` metadata of a GGUF."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise PretrainedError(f"{source}: unsupported tokenizer model {kind!r} (tokenizer.ggml.model); "
                                  "supported: 'gpt2' (byte-level BPE)")
        tokens = list(fields["tokenizer.ggml.tokens"])
        types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        name = lambda key: (tokens[int(fields[key])] if key in fields else None)
        eos = name("tokenizer.ggml.eos_token_id")
        # Chat models end a turn with <|im_end|> / <|eot_id|>; llama.cpp lists it as EOT.
        eot = name("tokenizer.ggml.eot_token_id")
        return cls.from_vocab(
            tokens, list(fields.get("tokenizer.ggml.merges", [])),
            bos=name("tokenizer.ggml.bos_token_id"), eos=tuple(t for t in (eos, eot) if t is not None),
            pad=name("tokenizer.ggml.padding_token_id"), unk=name("tokenizer.ggml.unknown_token_id"),
            special=[t for t, k in zip(tokens, types) if k == _CONTROL],
            user_defined=[t for t, k in zip(tokens, types) if k == _USER_DEFINED],
            pre=fields.get("tokenizer.ggml.pre", "default"),
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=fields.get("tokenizer.chat_template"), source=source)

    @classmethod
    def from_hf_dir(cls, path: str, extra_eos_ids: Sequence[int] = ()) -> "Tokenizer | None":
        """From ``tokenizer.json`` (+ ``tokenizer_config.json``); None when there is none."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise PretrainedError(f"{tj}: cannot read the tokenizer: {str(e).splitlines()[0]}") from e
        cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
        tok = lambda v: v.get("content") if isinstance(v, dict) else v
        eos = [tok(cfg.get("eos_token"))] if cfg.get("eos_token") else []
        eos += [backend.id_to_token(i) for i in extra_eos_ids if backend.id_to_token(i) is not None]
        template = cfg.get("chat_template")
        jinja = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja):
            with open(jinja) as f:
                template = f.read()
        return cls(backend, bos=tok(cfg.get("bos_token")), eos=tuple(dict.fromkeys(eos)),
                   pad=tok(cfg.get("pad_token")), unk=tok(cfg.get("unk_token")),
                   chat_template=template, source=tj)

    # ----------------------------------------------------------------- use
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the checkpoint's
        post-processor adds (BOS for Llama-style tokenizers, nothing for SmolLM2)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list, tuple or 1-D array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the checkpoint's
        template; extra keyword arguments become template variables."""
        if not self.chat_template:
            raise PretrainedError(f"{self.source}: this tokenizer has no chat template")
        template = _compile(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **{**self.special_tokens, **kwargs})

    def to_hf_dir(self, out_dir: str) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (transformers reads both)."""
        self.backend.save(os.path.join(out_dir, "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
               **self.special_tokens}
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------- pure functions
def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile(source: str) -> jinja2.Template:
    """The template in transformers' environment (sandboxed; whitespace control as theirs)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
