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


def test_package_scan_finds_mechanisms_in_new_subpackages(tmp_path, monkeypatch):
    # A subpackage nobody lists (like a future attn/linear/) registers on the first lookup.
    import sys

    import attn

    sub = tmp_path / "zz_scan_probe"
    sub.mkdir()
    (sub / "__init__.py").write_text("")
    (sub / "toy.py").write_text(
        "from attn import registry\n"
        "base = registry._REGISTRY['mha']\n"
        "registry.register(registry.Mechanism(name='zz_scanned', module=base.module,\n"
        "    config_cls=base.config_cls, init_cache=base.init_cache, stats=base.stats,\n"
        "    make_config=base.make_config, small_config=lambda w: {'window': w}))\n")
    registry.names()  # the real package first, so the probe sees 'mha'
    monkeypatch.setattr(attn, "__path__", [*attn.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "_builtins_loaded", False)
    try:
        assert "zz_scanned" in registry.names()
        assert registry.small_overrides(["zz_scanned", "mha"], 16) == {"zz_scanned": {"window": 16}}
    finally:
        registry._REGISTRY.pop("zz_scanned", None)
        for m in ("attn.zz_scan_probe.toy", "attn.zz_scan_probe"):
            sys.modules.pop(m, None)


@pytest.mark.parametrize("width", [32, 64, 256])
def test_small_config_hooks_build_valid_configs(width):
    # Every hook's overrides are accepted by its own make_config at the small-model shape.
    common = dict(d_model=width, num_heads=4, head_dim=max(32, width // 4), dtype="float32")
    with_hook = [n for n in registry.names() if registry.get(n).small_config is not None]
    assert {"gqa", "mla", "moh", "cca"} <= set(with_hook)
    for name, over in registry.small_overrides(registry.names(), width).items():
        cfg = registry.make_config(name, common, over)
        for k, v in over.items():
            assert getattr(cfg, k) == v, (name, k)
    assert registry.small_overrides(["gqa"], width) == {"gqa": {"num_kv_heads": 2}}
    assert registry.get("mla").small_config(width)["kv_lora_rank"] == width // 2


def test_mqar_config_takes_overrides_from_the_hooks():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "mqar.py")
    spec = importlib.util.spec_from_file_location("mqar_cfg_for_registry_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("attn=gqa+mla+mha")
    overrides = c.model.to_dict()["attn_overrides"]
    assert overrides == registry.small_overrides(["gqa", "mla"], c.model.d_model)
    # Unchanged from the table configs/mqar.py used to hold (its accuracy claims rest on it).
    assert overrides["mla"] == {"kv_lora_rank": 32, "qk_nope_head_dim": 16,
                                "qk_rope_head_dim": 8, "v_head_dim": 16}
