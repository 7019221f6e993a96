"""models/conversion: the measurements and the TransMLA command on a small LM."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import pretrained
from models.conversion import transmla
from models.conversion.common import eval_perplexity, kv_bytes_per_token
from models.transformer import LMConfig, Transformer

CFG = LMConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, attn="gqa", head_dim=8,
               attn_overrides={"gqa": {"num_kv_heads": 2}}, dtype="float32", scan_layers=True)


def _pre():
    params = nn.unbox(Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    return pretrained.Pretrained(CFG, params, None, "test", {})


def test_kv_bytes_count_what_each_layer_caches():
    # GQA: k and v, K=2 heads of 8 dims; MLA: latent L plus the shared RoPE key Hr.
    assert kv_bytes_per_token(CFG) == 2 * 2 * 2 * 8 * 2
    mla = LMConfig(vocab_size=64, d_model=32, num_layers=3, num_heads=4, attn="mla",
                   attn_overrides={"mla": {"kv_lora_rank": 12, "qk_rope_head_dim": 4}})
    assert kv_bytes_per_token(mla) == 3 * (12 + 4) * 2
    assert kv_bytes_per_token(mla, dtype=jnp.float32) == 3 * (12 + 4) * 4


def test_transmla_exact_setting_keeps_perplexity_and_compression_costs():
    pre = _pre()
    rng = np.random.default_rng(0)
    train_ids, eval_ids = rng.integers(0, 64, 200), rng.integers(0, 64, 70)
    base = eval_perplexity(CFG, pre.params, eval_ids, window=16)
    # rope_heads = K = 2, L = K·H = 16: exact.
    cfg, _, row = transmla.convert_and_measure(pre, kv_lora_rank=16, rope_heads=2, freq_fold=1,
                                               train_ids=train_ids, eval_ids=eval_ids, calib_tokens=64,
                                               window=16)
    assert cfg.attn == "mla" and row["tokens"] == base["tokens"]
    np.testing.assert_allclose(row["nll"], base["nll"], rtol=1e-5)
    assert row["kv_bytes_per_token"] == 2 * (16 + 2 * 8) * 2   # L + K·R: more than GQA (2·K·H)
    _, _, small = transmla.convert_and_measure(pre, kv_lora_rank=4, rope_heads=1, freq_fold=2,
                                               train_ids=train_ids, eval_ids=eval_ids, calib_tokens=64,
                                               window=16)
    assert small["kv_bytes_per_token"] == 2 * (4 + 8) * 2 and small["nll"] != base["nll"]


def test_transmla_command_refuses_bad_flags(capsys):
    assert transmla.main(["--kv-lora-rank", "8,4", "--out", "/tmp/x"]) == 2
    assert "--out saves one conversion" in capsys.readouterr().err
    assert transmla.main(["--kv-lora-rank", "0"]) == 2
    assert "positive integers" in capsys.readouterr().err
