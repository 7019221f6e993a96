"""Optimizers: Muon against the math (float64), optax and torch.optim.Muon; routing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.optim import OptimConfig, _muon_dims, make_optimizer

P = jax.sharding.PartitionSpec
NS = (3.4445, -4.7750, 2.0315)


def muon_config(**kw):
    base = dict(name="muon", learning_rate=1e-2, muon_learning_rate=0.1, warmup_steps=0,
                min_lr_ratio=1.0, weight_decay=0.0, grad_clip_norm=None)
    return OptimConfig(**{**base, **kw})


def ref_muon_steps(w_IO, grads, *, lr, wd, beta=0.95, nesterov=True, steps=5):
    """Jordan's reference in float64 from the math, on [in, out] matrices."""
    w = np.asarray(w_IO, np.float64)
    buf = np.zeros_like(w)
    a, b, c = NS
    for g in grads:
        g = np.asarray(g, np.float64)
        buf = beta * buf + (1 - beta) * g
        u = (1 - beta) * g + beta * buf if nesterov else buf
        x = u.T if u.shape[0] > u.shape[1] else u
        x = x / (np.linalg.norm(x) + 1e-7)
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        o = x.T if u.shape[0] > u.shape[1] else x
        fan_in, fan_out = w.shape
        w = w * (1 - lr * wd) - lr * np.sqrt(max(1.0, fan_out / fan_in)) * o
    return w


def run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_schedule_and_unknown_name():
    _, schedule = make_optimizer(OptimConfig(learning_rate=0.1, warmup_steps=2, min_lr_ratio=0.0), 10)
    assert [round(float(schedule(i)), 4) for i in (0, 1, 2, 10)] == [0.0, 0.05, 0.1, 0.0]
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match="optim.muon_beta must be in"):
        OptimConfig(name="muon", muon_beta=1.0)


@pytest.mark.parametrize("shape,names", [((12, 20), P("embed", "mlp")),
                                         ((20, 12), P("mlp", "embed")),
                                         ((6, 2, 5), P("latent", "heads", "head_dim"))])
def test_muon_update_is_orthogonal(shape, names):
    """One step from zero momentum: -update / (lr * shape factor) has singular values
    in the NS quintic's band (~[0.68, 1.2]), for the [fan_in, fan_out] flattening."""
    g = jax.random.normal(jax.random.key(1), shape)
    tx, _ = make_optimizer(muon_config(), 10, {"w": names})
    updates, _ = tx.update({"w": g}, tx.init({"w": g}), {"w": g})
    u = -np.asarray(updates["w"]).reshape(shape[0], -1) / 0.1
    fan_in, fan_out = u.shape
    s = np.linalg.svd(u / np.sqrt(max(1, fan_out / fan_in)), compute_uv=False)
    assert s.min() > 0.6 and s.max() < 1.25, s
    # Not the identity map on g: orthogonalisation equalised the spectrum.
    sg = np.linalg.svd(np.asarray(g).reshape(shape[0], -1), compute_uv=False)
    assert sg.max() / sg.min() > 3 and s.max() / s.min() < 2


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_vectors_are_not_decayed_matrices_are(name):
    params = {"w": jnp.full((4, 6), 2.0), "scale": jnp.full((4,), 2.0), "embedding": jnp.full((8, 4), 2.0)}
    axes_ = {"w": P("embed", "mlp"), "scale": P("embed"), "embedding": P("vocab", "embed")}
    tx, _ = make_optimizer(muon_config(name=name, weight_decay=0.5), 10, axes_)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(updates["scale"]).max()) == 0.0  # vector: no decay
    lr_w = 0.1 if name == "muon" else 1e-2
    np.testing.assert_allclose(updates["w"], -lr_w * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(updates["embedding"], -1e-2 * 0.5 * 2.0, rtol=1e-6)


def test_adam_branch_under_muon_equals_adamw():
    params = {"embedding": jax.random.normal(jax.random.key(0), (8, 4)),
              "scale": jnp.ones((4,))}
    axes_ = {"embedding": P("vocab", "embed"), "scale": P("embed")}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) + 0.1, params) for i in range(3)]
    cfg = dict(weight_decay=0.1, b1=0.8, b2=0.9)
    got = run(make_optimizer(muon_config(**cfg), 10, axes_)[0], params, grads)
    want = run(make_optimizer(muon_config(name="adamw", **cfg), 10, axes_)[0], params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def three_grads(shape, seed=2):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, shape) for k in keys]


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_float64_reference(nesterov):
    w = jax.random.normal(jax.random.key(0), (10, 7))
    gs = three_grads(w.shape)
    tx, _ = make_optimizer(muon_config(weight_decay=0.1, muon_nesterov=nesterov), 10,
                           {"w": P("embed", "mlp")})
    got = run(tx, {"w": w}, [{"w": g} for g in gs])["w"]
    want = ref_muon_steps(w, gs, lr=0.1, wd=0.1, nesterov=nesterov)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_muon_matches_optax_with_bias_correction():
    w = jax.random.normal(jax.random.key(0), (7, 10))
    gs = three_grads(w.shape)
    tx, _ = make_optimizer(muon_config(weight_decay=0.1, muon_bias_correction=True), 10,
                           {"w": P("embed", "mlp")})
    got = run(tx, {"w": w}, [{"w": g} for g in gs])["w"]
    peer = optax.contrib.muon(0.1, beta=0.95, weight_decay=0.1, eps=1e-7)
    want = run(peer, {"w": w}, [{"w": g} for g in gs])["w"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_muon_matches_torch_optim_muon():
    torch = pytest.importorskip("torch")
    w = jax.random.normal(jax.random.key(0), (10, 7))
    gs = three_grads(w.shape)
    tx, _ = make_optimizer(muon_config(weight_decay=0.1), 10, {"w": P("embed", "mlp")})
    got = run(tx, {"w": w}, [{"w": g} for g in gs])["w"]
    tw = torch.nn.Parameter(torch.tensor(np.asarray(w).T.copy()))  # torch: [out, in]
    opt = torch.optim.Muon([tw], lr=0.1, weight_decay=0.1, momentum=0.95, nesterov=True)
    for g in gs:
        tw.grad = torch.tensor(np.asarray(g).T.copy())
        opt.step()
    # torch runs Newton-Schulz in bfloat16: agreement to bf16 precision of the update.
    np.testing.assert_allclose(got, tw.detach().numpy().T, atol=3e-3)


# ---------------------------------------------------------------- routing, every mechanism
def lm_params(name, overrides):
    from models.transformer import LMConfig, Transformer

    cfg = LMConfig(vocab_size=16, d_model=32, num_layers=1, num_heads=2, head_dim=8,
                   attn=name, attn_overrides=overrides, tie_embeddings=False)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def mechanism_cases():
    from attn import registry

    cases = [(n, registry.small_overrides([n], 32)) for n in registry.names()]
    small = registry.small_overrides(["mla"], 32).get("mla", {})
    return cases + [("mla", {"mla": {**small, "q_lora_rank": 12}})]


@pytest.mark.parametrize("name,overrides", mechanism_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_hidden_matrix_goes_to_muon(name, overrides):
    """Adam: embedding, head, vectors, conv filters; Muon: every other kernel, each
    flattened to [fan_in, fan_out] with fan_in its input axes (axis names decide)."""
    params, axes_ = lm_params(name, overrides)
    dims = _muon_dims(params, axes_)
    is_spec = lambda x: x is None or isinstance(x, P)
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes_, is_leaf=is_spec)[0])
    flat_dims = dict(jax.tree_util.tree_flatten_with_path(
        dims, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))[0])
    seen_muon = 0
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, names, d = jax.tree_util.keystr(path), tuple(flat_axes[path]), flat_dims[path]
        # No feature-space axis at all (per-head vectors such as GLA/KDA's dt_bias [N, H],
        # or a kernel whose input axis is unnamed): not a map Muon can recognise -> Adam.
        unmapped = not {"embed", "latent", "mlp"} & set(names)
        if p.ndim < 2 or "vocab" in names or "conv" in key or unmapped:
            assert d is None, (key, names, d)
            continue
        assert d is not None, f"{key} {names} {p.shape} went to Adam"
        red, out = tuple(np.atleast_1d(d.reduction_axis)), tuple(np.atleast_1d(d.output_axis))
        assert red + out == tuple(range(p.ndim)), (key, names, d)  # whole kernel, no batch
        want_in = 1 if names[0] in ("embed", "latent", "mlp") else p.ndim - 1
        assert len(red) == want_in, (key, names, d)
        seen_muon += 1
    assert seen_muon >= 6  # q/k/v/o-style kernels + the three SwiGLU matrices


def test_scanned_layers_axis_is_a_batch_axis():
    params = {"q": jnp.ones((5, 4, 2, 3)), "o": jnp.ones((5, 2, 3, 4))}
    axes_ = {"q": P("layers", "embed", "heads", "head_dim"), "o": P("layers", "heads", "head_dim", "embed")}
    dims = _muon_dims(params, axes_)
    assert (dims["q"].reduction_axis, dims["q"].output_axis) == ((1,), (2, 3))
    assert (dims["o"].reduction_axis, dims["o"].output_axis) == ((1, 2), (3,))
    tx, _ = make_optimizer(muon_config(), 10, axes_)
    g = {k: jax.random.normal(jax.random.key(i), v.shape) for i, (k, v) in enumerate(params.items())}
    updates, _ = tx.update(g, tx.init(params), params)
    for layer in range(5):  # each layer orthogonalised on its own
        s = np.linalg.svd(-np.asarray(updates["q"][layer]).reshape(4, 6) / 0.1 / np.sqrt(1.5), compute_uv=False)
        assert s.min() > 0.6 and s.max() < 1.25


# ---------------------------------------------------------------- MoE experts
@pytest.mark.parametrize("lead", [(), ("layers",)])
def test_expert_axis_is_a_batch_axis(lead):
    """[E, D, F] / [E, F, D] expert kernels (after an optional LAYERS axis): every expert
    orthogonalised on its own as the D x F / F x D matrix it applies."""
    L, E, D, F = 2, 3, 8, 5
    pre = (L,) if lead else ()
    params = {"w_up": jnp.ones(pre + (E, D, F)), "w_down": jnp.ones(pre + (E, F, D))}
    axes_ = {"w_up": P(*lead, "expert", "embed", "mlp"), "w_down": P(*lead, "expert", "mlp", "embed")}
    dims = _muon_dims(params, axes_)
    n = len(lead) + 1
    for k in params:
        assert (dims[k].reduction_axis, dims[k].output_axis) == ((n,), (n + 1,)), (k, dims[k])
    tx, _ = make_optimizer(muon_config(), 10, axes_)
    g = {k: jax.random.normal(jax.random.key(i), v.shape) for i, (k, v) in enumerate(params.items())}
    updates, _ = tx.update(g, tx.init(params), params)
    for k, (fan_in, fan_out) in (("w_up", (D, F)), ("w_down", (F, D))):
        u = -np.asarray(updates[k]).reshape(-1, fan_in, fan_out) / 0.1 / np.sqrt(max(1, fan_out / fan_in))
        gk = np.asarray(g[k]).reshape(-1, fan_in, fan_out)
        for e in range(u.shape[0]):  # each (layer, expert) matrix
            s = np.linalg.svd(u[e], compute_uv=False)
            assert s.min() > 0.6 and s.max() < 1.25, (k, e, s)
            # Its own gradient's direction: orthogonalising the stacked matrix would not give this.
            np.testing.assert_allclose(u[e] / np.linalg.norm(u[e]),
                                       _polar(gk[e]) / np.linalg.norm(_polar(gk[e])), atol=0.15)


def _polar(g):
    """U V^T of g (float64): what Newton-Schulz approximates."""
    U, _, Vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
    return U @ Vt


@pytest.mark.parametrize("scan", [False, True])
def test_every_moe_parameter_is_routed(scan):
    """Router -> Adam; routed experts -> Muon per expert; shared experts -> Muon whole;
    the balance bias is no parameter at all (collection "moe_state")."""
    from models.transformer import LMConfig, Transformer

    cfg = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, attn="mha", ffn="moe",
                   ffn_overrides={"moe": {"num_experts": 4, "top_k": 2, "expert_dim": 6,
                                          "num_shared_experts": 1}},
                   tie_embeddings=False, scan_layers=scan, dtype="float32")
    variables = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    assert "moe_state" in variables
    boxed = variables["params"]
    params, axes_ = nn.unbox(boxed), nn.get_partition_spec(boxed)
    dims = _muon_dims(params, axes_)
    is_dims = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
    flat_dims = dict(jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_dims)[0])
    seen = set()
    for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, d = jax.tree_util.keystr(path), flat_dims[path]
        own = str(path[-1].key)
        if "bias" in own:
            raise AssertionError(f"{key}: the balance bias must not be a parameter")
        lead = 1 if scan else 0
        if own == "router":
            assert d is None, (key, d)
            seen.add("router")
        elif own.startswith("experts_"):
            assert d is not None, key
            assert (d.reduction_axis, d.output_axis) == ((lead + 1,), (lead + 2,)), (key, d)
            seen.add(own)
        elif own.startswith("shared_"):
            assert d is not None, key
            assert (d.reduction_axis, d.output_axis) == ((lead,), (lead + 1,)), (key, d)
            seen.add(own)
    assert seen == {"router", "experts_w_gate", "experts_w_up", "experts_w_down",
                    "shared_w_gate", "shared_w_up", "shared_w_down"}, seen
