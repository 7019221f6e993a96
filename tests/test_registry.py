"""attn.registry: names, config factories, errors."""

import pytest

from attn import registry


def test_builtins_registered_after_import():
    assert {"mha", "gqa", "mqa"} <= set(registry.names())
    assert registry.get("mha").module.__name__ == "MHA"


def test_kv_heads_per_mechanism():
    common = dict(d_model=96, num_heads=12, dtype="float32", unrelated_field=1)
    assert registry.make_config("mha", common).num_kv_heads == 12
    assert registry.make_config("gqa", common).num_kv_heads == 3
    assert registry.make_config("gqa", common, {"num_kv_heads": 6}).num_kv_heads == 6
    assert registry.make_config("mqa", common).num_kv_heads == 1
    # Default K follows an overridden N; N=9 has no divisor 2, so K drops to 1.
    assert registry.make_config("gqa", common, {"num_heads": 9, "head_dim": 8}).num_kv_heads == 1
    assert registry.make_config("gqa", dict(common, num_heads=2)).num_kv_heads == 1
    assert registry.make_config("mha", common, {"window": 8}).window == 8


def test_errors_name_key_and_mechanism():
    with pytest.raises(ValueError, match="unknown attention mechanism 'nope'.*'gqa'"):
        registry.get("nope")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['windw'\].*'gqa'"):
        registry.make_config("gqa", dict(d_model=32, num_heads=4), {"windw": 3})
    with pytest.raises(ValueError, match="'mqa' fixes num_kv_heads=1"):
        registry.make_config("mqa", dict(d_model=32, num_heads=4), {"num_kv_heads": 2})
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        registry.make_config("gqa", dict(d_model=32, num_heads=4), {"num_kv_heads": 3})


def test_register_new_mechanism():
    base = registry.get("mha")
    mech = registry.register(registry.Mechanism(
        name="test_alias", module=base.module, config_cls=base.config_cls,
        init_cache=base.init_cache, stats=base.stats, make_config=base.make_config))
    try:
        assert registry.get("test_alias") is mech
    finally:
        registry._REGISTRY.pop("test_alias")
