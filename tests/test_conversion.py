"""models/conversion: the measurements and the TransMLA command on a small LM."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_moh_conversion_keeps_the_heads_it_routes_to():
    """A zero learned router picks the lowest routed heads with weight 1 (official scaling):
    the MoH model equals the original with the other heads' output rows zeroed."""
    from models.conversion import moh

    pre = _pre()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)), jnp.int32)
    params, cfg = moh.convert_lm(pre.params, CFG, num_shared_heads=1, top_k=2, router="learned")
    assert cfg.attn == "moh" and cfg.layer_configs[0].num_kv_heads == 2
    assert not np.any(np.asarray(params["units"]["block_0"]["attn"]["router_kernel"]))
    dropped = jax.tree_util.tree_map(lambda a: a, pre.params)
    dropped["units"]["block_0"]["attn"]["o_kernel"] = pre.params["units"]["block_0"]["attn"]["o_kernel"].at[:, 3].set(0)
    want = jax.jit(Transformer(CFG).apply)({"params": dropped}, tokens)[0]
    got = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    qn, qcfg = moh.convert_lm(pre.params, CFG, num_shared_heads=1, top_k=2)   # parameter-free router
    assert qcfg.layer_configs[0].router == "query_norm" and len(jax.tree.leaves(qn)) == len(jax.tree.leaves(pre.params))
    assert moh.main(["--top-k", "1,2", "--out", "/tmp/x"]) == 2


def test_xecomla_svd_init_reconstructs_the_projections():
    """Float64 checks from the math: full ranks reproduce W_q's slices, the repeated W_k/W_v and
    the mean RoPE key; a truncated latent leaves the Eckart-Young residual; one token's
    attention is its value, so full-rank values give the original logits at T = 1."""
    from attn import mha
    from models.conversion import xecomla

    rng = np.random.default_rng(2)
    D, N, K, H, Hr = 12, 4, 2, 6, 2
    g = mha.Config(d_model=D, num_heads=N, num_kv_heads=K, head_dim=H, dtype="float32")
    p = {"q_kernel": rng.normal(size=(D, N, H)), "k_kernel": rng.normal(size=(D, K, H)),
         "v_kernel": rng.normal(size=(D, K, H)), "o_kernel": rng.normal(size=(N, H, D))}
    full = min(D, 2 * N * H)
    out, m = xecomla.convert_layer(p, g, kv_lora_rank=full, rope_dim=Hr, q_lora_rank=D)
    o = {k: np.asarray(v, np.float64) for k, v in out.items()}
    Hn = H - Hr
    assert (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_norm, m.q_norm) == (Hn, Hr, H, False, False)
    np.testing.assert_allclose(np.einsum("DL,LNH->DNH", o["q_down_kernel"], o["q_nope_kernel"]),
                               p["q_kernel"][..., :Hn], atol=1e-4)
    np.testing.assert_allclose(np.einsum("DL,LNH->DNH", o["q_down_kernel"], o["q_rope_kernel"]),
                               p["q_kernel"][..., H - Hr:], atol=1e-4)
    rep = lambda w: np.repeat(w, N // K, axis=1)
    np.testing.assert_allclose(np.einsum("DL,LNH->DNH", o["kv_down_kernel"], o["k_up_kernel"]),
                               rep(p["k_kernel"])[..., :Hn], atol=1e-4)
    np.testing.assert_allclose(np.einsum("DL,LNH->DNH", o["kv_down_kernel"], o["v_up_kernel"]),
                               rep(p["v_kernel"]), atol=1e-4)
    np.testing.assert_allclose(o["k_rope_kernel"], p["k_kernel"][..., H - Hr:].mean(1), atol=1e-6)
    L = 5
    small, _ = xecomla.convert_layer(p, g, kv_lora_rank=L, rope_dim=Hr)
    w = np.concatenate([rep(p["k_kernel"]).reshape(D, -1), rep(p["v_kernel"]).reshape(D, -1)], 1)
    recon = np.concatenate([np.einsum("DL,LNH->DNH", np.asarray(small["kv_down_kernel"], np.float64),
                                      np.asarray(small[k], np.float64)).reshape(D, -1)
                            for k in ("k_up_kernel", "v_up_kernel")], 1)
    sv = np.linalg.svd(w, compute_uv=False)
    resid = np.concatenate([w[:, :N * H].reshape(D, N, H)[..., :Hn].reshape(D, -1), w[:, N * H:]], 1) - recon
    assert np.sum(resid ** 2) <= np.sum(sv[L:] ** 2) + 1e-6        # the k-rope dims are dropped too
    # The whole LM at T = 1.
    pre = _pre()
    params, cfg = xecomla.convert_lm(pre.params, CFG, kv_lora_rank=min(32, 2 * 4 * 8), rope_dim=2)
    t = jnp.asarray([[5], [9]], jnp.int32)
    np.testing.assert_allclose(np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, t)[0]),
                               np.asarray(jax.jit(Transformer(CFG).apply)({"params": pre.params}, t)[0]), atol=1e-4)
    with pytest.raises(ValueError, match="exceeds the rank"):
        xecomla.convert_layer(p, g, kv_lora_rank=full + 1, rope_dim=Hr)
    with pytest.raises(ValueError, match="rope_dim must be an even int"):
        xecomla.convert_layer(p, g, kv_lora_rank=4, rope_dim=3)


def test_liger_conversion_keeps_the_weights_and_counts_its_state():
    from models.conversion import liger

    pre = _pre()
    params, cfg = liger.convert_lm(pre.params, CFG, window=8)
    assert cfg.attn == "liger" and jax.tree.structure(params) == jax.tree.structure(pre.params)
    # 2 layers x (float32 GLA state N·H·H + a bf16 ring of 8 tokens' k and v, int32 position/segment).
    assert liger.state_bytes(cfg) == 2 * (4 * 4 * 8 * 8 + 8 * (2 * 2 * 8 * 2 + 8))
    gla_params, gla = liger.convert_lm(pre.params, CFG, hybrid=False)
    assert gla.layer_configs[0].window is None and liger.state_bytes(gla) == 2 * 4 * 4 * 8 * 8
    t = jnp.arange(6)[None] % 64
    assert np.all(np.isfinite(np.asarray(jax.jit(Transformer(gla).apply)({"params": gla_params}, t)[0])))
    assert liger.main(["--window", "0"]) == 2
