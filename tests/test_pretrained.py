"""models.pretrained: parity with transformers (real SmolLM2 GGUF, tiny random HF families),
export round trip, one-line errors, tokenizer and chat template.

transformers + torch (CPU) are test-only peers; the module is skipped without them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import jax.numpy as jnp  # noqa: E402

from models.pretrained import KNOWN_NAMES, PretrainedError, export, load  # noqa: E402
from models.transformer import Transformer  # noqa: E402

# Awkward ids spread over the vocab (no zeros, no special-token runs).
IDS = [1, 4093, 314, 17, 2524, 7290, 28, 30, 49151, 1423, 253, 9861, 102, 3, 42, 768]


def _smollm2_path():
    try:
        return KNOWN_NAMES["smollm2-135m"]()
    except PretrainedError as e:
        pytest.skip(str(e))


def _attn_logits(p, ids_BT):
    logits, _ = Transformer(p.config).apply({"params": p.params}, jnp.asarray(ids_BT, jnp.int32))
    return np.asarray(logits, np.float32)


def _hf_logits(model, ids_BT):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids_BT), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_hf():
    path = _smollm2_path()
    return os.path.dirname(path), os.path.basename(path)


# --------------------------------------------------------------------------- real GGUF
def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    d, name = smollm2_hf
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    ref = _hf_logits(model, [IDS])
    got = _attn_logits(smollm2, [IDS])
    assert got.shape == ref.shape == (1, len(IDS), 49152)
    diff = float(np.max(np.abs(got - ref)))
    print(f"smollm2 max |logits diff| = {diff:.3g} (logit scale {float(np.abs(ref).max()):.3g})")
    assert diff < 2e-3, diff
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


# --------------------------------------------------------------------------- tiny HF families
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               rms_norm_eps=1e-5, rope_theta=10_000.0)

FAMILIES = {
    "llama-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                   dict(tie_word_embeddings=True)),
    "llama-untied": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                     dict(tie_word_embeddings=False)),
    "qwen2-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(tie_word_embeddings=False)),
    "qwen3-qknorm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                     dict(tie_word_embeddings=True, head_dim=16)),
    "mistral-window4": (transformers.MistralConfig, transformers.MistralForCausalLM,
                        dict(tie_word_embeddings=False, sliding_window=4)),
}


def _tiny(family, out_dir):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cfg_cls(**_COMMON, **extra)
    cfg._attn_implementation = "eager"  # sliding windows are honoured by eager attention
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random norms / biases, so a dropped or misplaced one shows
        for n, w in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                w.copy_(1.0 + 0.3 * torch.randn_like(w) if "norm" in n else 0.3 * torch.randn_like(w))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def _ids(seed=1, T=11):
    return np.random.default_rng(seed).integers(1, 128, size=(2, T))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_hf_import_matches_transformers(family, tmp_path):
    model = _tiny(family, tmp_path / "m")
    p = load(str(tmp_path / "m"))
    ids = _ids()  # T=11 > sliding_window=4
    np.testing.assert_allclose(_attn_logits(p, ids), _hf_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama-untied", "qwen2-bias"])
def test_export_round_trip(family, tmp_path):
    model = _tiny(family, tmp_path / "m")
    p = load(str(tmp_path / "m"))
    out = export(p, str(tmp_path / "out"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(2)
    np.testing.assert_allclose(_hf_logits(back, ids), _hf_logits(model, ids), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_attn_logits(load(out), ids), _attn_logits(p, ids), atol=1e-6)


# --------------------------------------------------------------------------- errors
def _one_line(excinfo, needle):
    msg = str(excinfo.value)
    assert "\n" not in msg and needle in msg, msg


def test_missing_file_error(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(PretrainedError) as e:
        load(path)
    _one_line(e, path)


def test_truncated_gguf_error(tmp_path):
    path = tmp_path / "cut.gguf"
    with open(_smollm2_path(), "rb") as f:
        path.write_bytes(f.read(1024))
    with pytest.raises(PretrainedError) as e:
        load(str(path))
    _one_line(e, str(path))


def test_unknown_architecture_error(tmp_path):
    _tiny("llama-tied", tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"model_type": "llama"', '"model_type": "gpt_neox"'))
    with pytest.raises(PretrainedError) as e:
        load(str(tmp_path / "m"))
    _one_line(e, "config.json")
    assert "gpt_neox" in str(e.value)


# --------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_hf):
    d, name = smollm2_hf
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines", "café naïve — ünïcode ✓",
         "<|im_start|>user\nhi<|im_end|>", "don't you'll we've", "digit 7 alone"]


def test_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    tok = smollm2.tokenizer
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(ours, skip_special_tokens=False) == text


def test_chat_template_matches_transformers(smollm2, hf_tokenizer):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    for gen in (True, False):
        ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=gen) == ref
