"""MoH layer: routing equations, dense == gather, decode == full forward, aux loss, stats, LM, MQAR."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import moh, registry
from attn.cache import KVCache, RingKVCache, cache_nbytes

B, T, D = 2, 7, 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEG = np.array([[1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1]], np.int32)
POS_SEG = np.array([[0, 1, 2, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3, 4]], np.int32)
POS = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))

CONFIGS = {
    # MHA-style K = N = 4, 2 shared + top-1 of 2 routed: A = 3 < K, so "auto" gathers at decode.
    "moh": moh.Config(d_model=D, num_heads=4, num_shared_heads=2, top_k=1, dtype="float32"),
    # GQA K = 2, one shared head (no shared router), top-2 of 3, window, qk-norm, released scaling.
    "gqa_win_official": moh.Config(d_model=D, num_heads=4, num_kv_heads=2, num_shared_heads=1,
                                   top_k=2, window=3, qk_norm=True, gate_scaling="official",
                                   dtype="float32"),
    # No shared heads (no α), biases, softcap, H = 6.
    "routed_only": moh.Config(d_model=D, num_heads=4, head_dim=6, num_shared_heads=0, top_k=2,
                              use_bias=True, softcap=5.0, dtype="float32"),
    # MoH-LLaMA3's parameter-free router (query norms), GQA, one shared head, top-2 of 3.
    "query_norm": moh.Config(d_model=D, num_heads=4, num_kv_heads=2, num_shared_heads=1, top_k=2,
                             router="query_norm", dtype="float32"),
}
LEARNED = [n for n in CONFIGS if CONFIGS[n].router == "learned"]


def _with(name, **kw):
    return CONFIGS[name].replace(**kw)


@functools.lru_cache(maxsize=None)
def _params(name):
    cfg = CONFIGS[name]
    shapes = jax.eval_shape(lambda: nn.unbox(moh.MoH(cfg).init(jax.random.key(0), jnp.zeros((B, T, D)))))
    rng = np.random.default_rng(0)
    shapes = {"params": shapes["params"]}  # init also returns the sown "aux_loss"
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape) + (a.ndim < 2), a.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, pos, seg, cache):
    return moh.MoH(cfg).apply(params, x, positions_BT=pos, segment_ids_BT=seg, cache=cache)


def _x(seed=2):
    return jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)


# --------------------------------------------------------------------------- routing
@pytest.mark.parametrize("name", LEARNED)
def test_routing_follows_the_equations(name):
    """Gates against numpy: §3.2 (paper) or the released code's rescaling (official)."""
    cfg = CONFIGS[name]
    p = _params(name)["params"]
    x = np.asarray(_x(), np.float64)
    r = moh.route(p, jnp.asarray(x, jnp.float32), cfg)
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    hs, k, R = cfg.num_shared_heads, cfg.top_k, cfg.num_routed_heads
    probs = softmax(x @ np.asarray(p["router_kernel"], np.float64))
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, top, 1.0, axis=-1)
    routed = probs * chosen
    official = cfg.gate_scaling == "official"
    if official:
        routed = routed / routed.sum(-1, keepdims=True) * k
    if hs:
        shared = (softmax(x @ np.asarray(p["shared_router_kernel"], np.float64)) if hs > 1
                  else np.ones(x.shape[:2] + (1,)))
        alpha = softmax(x @ np.asarray(p["mix_router_kernel"], np.float64))
        if official:
            shared, alpha = shared * hs, alpha * 2
        gates = np.concatenate([alpha[..., :1] * shared, alpha[..., 1:] * routed], -1)
    else:
        gates = routed
    np.testing.assert_allclose(np.asarray(r.gates_BTN), gates, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(r.chosen_BTN), chosen)
    np.testing.assert_array_equal(np.sort(np.asarray(r.heads_BTN), -1)[..., hs:], np.sort(top, -1) + hs)
    assert r.heads_BTN.shape == (B, T, cfg.active_heads)
    # Unselected routed heads get exactly 0; the paper's gates sum to α1 + α2·Σ top-k probs ≤ 1.
    assert np.all(np.asarray(r.gates_BTN)[..., hs:][chosen == 0] == 0)
    if not official:
        assert np.all(gates.sum(-1) <= 1 + 1e-6)


def test_query_norm_routing_follows_the_released_code():
    """MoH-LLaMA3: softmax(|q_i| / std over routed heads), top-k, binary gates; no router params."""
    cfg = CONFIGS["query_norm"]
    p = _params("query_norm")["params"]
    assert not any("router" in k for k in p) and moh.param_count(cfg) == sum(a.size for a in jax.tree.leaves(p))
    x = np.asarray(_x(), np.float64)
    q = np.einsum("BTD,DNH->BTNH", x, np.asarray(p["q_kernel"], np.float64))
    hs, k = cfg.num_shared_heads, cfg.top_k
    norms = np.linalg.norm(q[:, :, hs:], axis=-1)
    z = norms / norms.std(-1, ddof=1, keepdims=True)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    chosen = np.zeros_like(probs)
    np.put_along_axis(chosen, top, 1.0, axis=-1)
    gates = np.concatenate([np.ones(x.shape[:2] + (hs,)), chosen], -1)
    pos = jnp.asarray(POS)
    qj = moh.mha.project_qkv(p, jnp.asarray(x, jnp.float32), pos, cfg)[0]   # after RoPE: same norms
    r = moh.route(p, None, cfg, q_BTNH=qj)
    np.testing.assert_array_equal(np.asarray(r.gates_BTN), gates)
    np.testing.assert_allclose(np.asarray(r.probs_BTN), probs, atol=1e-5)
    with pytest.raises(ValueError, match="pass q_BTNH"):
        moh.route(p, None, cfg)
    with pytest.raises(ValueError, match="Config.router must be one of"):
        moh.Config(d_model=D, num_heads=4, router="norm")


# --------------------------------------------------------------------------- dense == gather
@pytest.mark.parametrize("name", list(CONFIGS))
def test_gather_equals_dense_full_forward(name):
    params, x = _params(name), _x()
    pos, seg = jnp.asarray(POS_SEG), jnp.asarray(SEG)
    y_dense, _ = _apply(_with(name, head_selection="dense"), params, x, pos, seg, None)
    y_gather, _ = _apply(_with(name, head_selection="gather"), params, x, pos, seg, None)
    np.testing.assert_allclose(np.asarray(y_gather), np.asarray(y_dense), atol=2e-5, rtol=2e-5)


DECODE_CASES = [
    ("moh", "auto", False, [1] * T),        # auto -> gather for T = 1, dense for the prefill
    ("moh", "dense", True, [3, 1, 3]),
    ("gqa_win_official", "gather", True, [1, 5, 1]),
    ("routed_only", "auto", True, [2, 1, 4]),
]


@pytest.mark.parametrize("name,selection,segments,chunks", DECODE_CASES,
                         ids=[f"{n}-{s}-seg{int(g)}-{'x'.join(map(str, c))}" for n, s, g, c in DECODE_CASES])
def test_decode_equals_full_forward(name, selection, segments, chunks):
    cfg, params, x = _with(name, head_selection=selection), _params(name), _x()
    pos = jnp.asarray(POS_SEG if segments else POS)
    seg = jnp.asarray(SEG) if segments else None
    y_full, _ = _apply(_with(name, head_selection="dense"), params, x, pos, seg, None)
    cache = moh.init_cache(cfg, batch=B, max_len=T + 2, dtype=jnp.float32)
    assert isinstance(cache, RingKVCache if cfg.window is not None else KVCache)
    outs, t = [], 0
    for n in chunks:
        y, cache = _apply(cfg, params, x[:, t:t + n], pos[:, t:t + n],
                          None if seg is None else seg[:, t:t + n], cache)
        outs.append(y)
        t += n
    assert int(cache.length) == T
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(y_full),
                               atol=2e-5, rtol=2e-5)


def test_auto_rule():
    m, g = CONFIGS["moh"], CONFIGS["gqa_win_official"]
    cache = object()
    assert moh._use_gather(m, 1, cache) and not moh._use_gather(m, 2, cache)
    assert not moh._use_gather(m, 1, None)
    assert not moh._use_gather(g, 1, cache)  # A = 3 active heads >= K = 2 cached kv heads
    assert moh._use_gather(g.replace(head_selection="gather"), 5, None)


# --------------------------------------------------------------------------- aux loss
def test_load_balance_loss_is_sown_finite_positive_and_ignores_padding():
    name = "moh"
    cfg, params = CONFIGS[name], _params(name)
    pos, seg, x = jnp.asarray(POS_SEG), jnp.asarray(SEG), _x()

    @jax.jit
    def run(params, x):
        (y, _), aux = moh.MoH(cfg).apply(params, x, positions_BT=pos, segment_ids_BT=seg,
                                         mutable=["aux_loss"])
        return y, aux

    y, aux = run(params, x)
    (lb,) = aux["aux_loss"]["moh_load_balance"]
    assert lb.shape == () and np.isfinite(float(lb)) and float(lb) > 0
    r = moh.route(params["params"], x, cfg)
    w = (SEG != 0).astype(np.float64)[..., None]
    f = (np.asarray(r.chosen_BTN) * w).sum((0, 1)) / w.sum()
    P = (np.asarray(r.probs_BTN) * w).sum((0, 1)) / w.sum()
    np.testing.assert_allclose(float(lb), float(np.sum(f * P)), rtol=1e-5)
    # Padding tokens (segment 0) do not count.
    x_pad = x.at[1, :2].set(_x(seed=7)[1, :2])
    (lb2,) = run(params, x_pad)[1]["aux_loss"]["moh_load_balance"]
    assert float(lb2) == pytest.approx(float(lb), rel=1e-6)
    # The router learns through both the weighted head sum and the balance loss.
    def objective(p):
        y, aux = run(p, x)
        return jnp.sum(y) + 0.01 * aux["aux_loss"]["moh_load_balance"][0]

    grads = jax.jit(jax.grad(objective))(params)
    for k in ("router_kernel", "mix_router_kernel", "shared_router_kernel"):
        assert float(jnp.abs(grads["params"][k]).sum()) > 0, k


# --------------------------------------------------------------------------- stats
@pytest.mark.parametrize("name", list(CONFIGS))
def test_stats_match_counted_params_and_cache_bytes(name):
    cfg = CONFIGS[name].replace(dtype="bfloat16")
    params = jax.eval_shape(lambda: nn.unbox(moh.MoH(cfg).init(jax.random.key(0), _x()))["params"])
    s = moh.stats(cfg, seq_len=16)
    assert s["params"] == sum(a.size for a in jax.tree_util.tree_leaves(params))
    assert s["state_bytes"] == 0
    batch, max_len = 3, 11
    cache = moh.init_cache(cfg, batch, max_len)
    slots = cfg.window if cfg.window is not None else max_len
    assert cache_nbytes(cache) - cache.length.nbytes == s["kv_bytes_per_token"] * batch * slots


def test_flops_count_active_heads():
    cfg = moh.Config(d_model=32, num_heads=4, num_shared_heads=1, top_k=1, head_dim=8)
    s = moh.stats(cfg, seq_len=4)
    proj = 2 * (32 * 4 * 8 * 4)
    router = 2 * 32 * (3 + 2)  # W_r over 3 routed heads, W_h; one shared head has no W_s
    assert s["flops_per_token"] == proj + router + 2 * 2 * 16 * 2.5


# --------------------------------------------------------------------------- LM
def test_lm_aux_loss_and_generate_reproduces_forward_logits():
    from models.transformer import LMConfig, Transformer, generate

    V, P, NEW = 29, 5, 4
    cfg = LMConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4, attn="moh",
                   attn_overrides={"moh": {"num_shared_heads": 1, "top_k": 1}}, dtype="float32")
    assert cfg.layer_configs[0].active_heads == 2
    shapes = jax.eval_shape(lambda: nn.unbox(
        Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(1)
    variables = {"params": jax.tree_util.tree_map(
        lambda a: jnp.asarray(0.15 * rng.standard_normal(a.shape) + (a.ndim == 1), a.dtype), shapes)}
    prompt = jax.random.randint(jax.random.key(0), (2, P), 0, V)
    mask = jnp.array([[True] * P, [False, False] + [True] * (P - 2)])
    tokens, logits = generate(cfg, variables, prompt, max_new_tokens=NEW, prompt_mask_BT=mask,
                              return_logits=True)
    full = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
    seg = jnp.concatenate([mask, jnp.ones((2, NEW - 1), bool)], axis=1).astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    (ref, _), aux = jax.jit(lambda v, t, p, s: Transformer(cfg).apply(
        v, t, positions_BT=p, segment_ids_BT=s, mutable=["aux_loss"]))(variables, full, pos, seg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref[:, P - 1:]), atol=1e-4, rtol=1e-4)
    leaves = jax.tree_util.tree_leaves(aux["aux_loss"])
    assert len(leaves) == 2 and all(np.isfinite(float(a)) and float(a) > 0 for a in leaves)


def test_mqar_training_lowers_loss_with_ccgqa_and_moh():
    """A few MQAR steps through train_and_evaluate; the trainer adds the MoH aux loss."""
    import tempfile

    from train import train_and_evaluate
    from train.config_args import load_config
    from train.metrics import read_scalars

    c = load_config(os.path.join(ROOT, "configs/mqar.py"))
    c.model.update(dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, attn="ccgqa,moh",
                        attn_overrides={}))
    c.data.update(dict(seq_len=32, batch_size=16, eval_batch_size=16))
    c.data.options.update(dict(vocab_size=64, num_kv_pairs=4))
    c.optim.update(dict(warmup_steps=2, learning_rate=1e-2))
    c.train.update(dict(num_steps=24, log_every=4, eval_every=0, eval_steps=1, progress_bar=False))
    c.checkpoint.update(dict(enabled=False))
    with tempfile.TemporaryDirectory() as workdir:
        result = train_and_evaluate(c, workdir)
        scalars = read_scalars(os.path.join(workdir, "tb"))
    losses = [v for _, v in scalars["train/loss"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.3, losses
    assert 0 < result["train/aux_loss"] < 10
    assert result["eval/loss"] < np.log(64)


# --------------------------------------------------------------------------- errors
def test_bad_config_raises_clear_errors():
    with pytest.raises(ValueError, match=r"top_k=3 must be an int in \[1, 2\].*4 - 2"):
        moh.Config(d_model=32, num_heads=4, num_shared_heads=2, top_k=3)
    with pytest.raises(ValueError, match="top_k=0"):
        moh.Config(d_model=32, num_heads=4, top_k=0)
    with pytest.raises(ValueError, match=r"num_shared_heads must be an int in \[0, num_heads=4\), got 4"):
        moh.Config(d_model=32, num_heads=4, num_shared_heads=4)
    with pytest.raises(ValueError, match="sinks=True is not supported"):
        moh.Config(d_model=32, num_heads=4, sinks=True)
    with pytest.raises(ValueError, match="gate_scaling must be one of"):
        moh.Config(d_model=32, num_heads=4, gate_scaling="mine")
    with pytest.raises(ValueError, match="head_selection must be one of"):
        moh.Config(d_model=32, num_heads=4, head_selection="sparse")
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        moh.Config(d_model=32, num_heads=4, num_kv_heads=3)
    c = registry.make_config("moh", dict(d_model=64, num_heads=8, dtype="float32"))
    assert (c.num_shared_heads, c.top_k, c.num_kv_heads) == (4, 2, 8)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['topk'\].*'moh'"):
        registry.make_config("moh", dict(d_model=32, num_heads=4), {"topk": 1})
    cfg, params = CONFIGS["moh"], _params("moh")
    with pytest.raises(ValueError, match="MoH: x must be"):
        moh.MoH(cfg).apply(params, jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match="positions_BT is required"):
        moh.MoH(cfg).apply(params, _x()[:, :1], cache=moh.init_cache(cfg, B, 4))
