"""Data sources: MQAR layout and determinism, the pydoc text split, token-file errors."""

import math

import numpy as np
import pytest

from train.config_args import parse_arg_string
from train.data import (DataConfig, DataSource, MQARSource, make_source, pydoc_corpus_bytes,
                        register_source, registered_sources)
from train.metrics import summarize_eval, weighted_sums


def mqar(T=64, seed=0, **options):
    opts = {"vocab_size": 64, "num_kv_pairs": 8, **options}
    return make_source(DataConfig(source="mqar", seq_len=T, batch_size=8, seed=seed, options=opts))


# --------------------------------------------------------------------------- MQAR
def test_mqar_is_a_function_of_seed_split_and_step():
    a, b = mqar(), mqar()
    first = a.batch("train", 5, 8)
    for k, v in b.batch("train", 5, 8).items():
        np.testing.assert_array_equal(first[k], v)
    # Asking for other steps in between does not change step 5 (no hidden iterator state).
    a.batch("train", 6, 8)
    np.testing.assert_array_equal(a.batch("train", 5, 8)["inputs"], first["inputs"])
    assert not np.array_equal(a.batch("train", 6, 8)["inputs"], first["inputs"])
    assert not np.array_equal(a.batch("eval", 5, 8)["inputs"], first["inputs"])
    assert not np.array_equal(mqar(seed=1).batch("train", 5, 8)["inputs"], first["inputs"])


@pytest.mark.parametrize("power_a", [0.01, 1.0])  # Zoology's power law, and uniform gaps
@pytest.mark.parametrize("T", [64, 67])
def test_mqar_answer_positions(power_a, T):
    n, V = 8, 64
    b = mqar(T=T, power_a=power_a).batch("train", 3, 8)
    inputs, targets, weights = b["inputs"], b["targets"], b["weights"]
    assert inputs.shape == targets.shape == weights.shape == (8, T)
    assert inputs.dtype == targets.dtype == np.int32 and weights.dtype == np.float32
    assert inputs.min() >= 0 and inputs.max() < V
    for row in range(8):
        keys, values = inputs[row, 0:2 * n:2], inputs[row, 1:2 * n:2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert keys.min() >= 1 and keys.max() < V // 2 and values.min() >= V // 2
        answer = dict(zip(keys.tolist(), values.tolist()))
        pos = np.flatnonzero(weights[row])
        assert set(weights[row].tolist()) <= {0.0, 1.0} and len(pos) == n
        assert np.all(pos >= 2 * n) and np.all((pos - 2 * n) % 2 == 0)
        # Each key is queried exactly once, and the target there is its value.
        assert sorted(inputs[row, pos].tolist()) == sorted(keys.tolist())
        for p in pos:
            assert targets[row, p] == answer[int(inputs[row, p])]
        # Elsewhere the targets are just the next input (weight 0).
        other = np.setdiff1d(np.arange(T - 1), pos)
        np.testing.assert_array_equal(targets[row, other], inputs[row, other + 1])


def test_mqar_power_law_puts_queries_early():
    w = mqar(T=256, power_a=0.01).batch("train", 0, 64)["weights"]
    u = mqar(T=256, power_a=1.0).batch("train", 0, 64)["weights"]
    mean_pos = lambda w: float((w * np.arange(256)).sum() / w.sum())
    assert mean_pos(w) < mean_pos(u)


def test_mqar_validation_names_the_field():
    with pytest.raises(ValueError, match="vocab_size=16"):
        mqar(vocab_size=16, num_kv_pairs=8)
    with pytest.raises(ValueError, match="seq_len=16"):
        mqar(T=16)
    with pytest.raises(ValueError, match="data.options.bogus"):
        mqar(bogus=1)
    with pytest.raises(ValueError, match="data.source='nope'"):
        DataConfig(source="nope")
    with pytest.raises(ValueError, match="unknown config key data.colour"):
        DataConfig.from_dict({"source": "mqar", "colour": "red"})


# --------------------------------------------------------------------------- text
def test_text_split_is_the_held_out_tail():
    data = pydoc_corpus_bytes()
    assert 400_000 < data.size < 600_000
    src = make_source(DataConfig(source="text", seq_len=32, batch_size=4))
    train, held_out = src.splits["train"], src.splits["eval"]
    assert train.size + held_out.size == data.size
    assert abs(held_out.size / data.size - 0.05) < 1e-3
    np.testing.assert_array_equal(held_out, data[-held_out.size:])
    assert src.vocab_size == 256 and src.token_unit == "byte"

    b = src.batch("eval", 0, 4)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    eval_bytes = held_out.tobytes()
    for row in b["inputs"]:
        assert row.astype(np.uint8).tobytes() in eval_bytes
    np.testing.assert_array_equal(src.batch("eval", 0, 4)["inputs"], b["inputs"])


def test_bits_per_byte():
    # Uniform logits over 256 bytes cost exactly 8 bits per byte.
    sums = weighted_sums(np.zeros((2, 3, 256), np.float32), np.zeros((2, 3), np.int32),
                         np.ones((2, 3), np.float32))
    out = summarize_eval({k: float(v) for k, v in sums.items()}, "byte")
    assert math.isclose(out["eval/bits_per_byte"], 8.0, rel_tol=1e-6)
    assert math.isclose(out["eval/loss"], math.log(256), rel_tol=1e-6)


def test_weights_mask_the_loss():
    logits = np.zeros((1, 2, 4), np.float32)
    logits[0, 1, 0] = 10.0  # the second position is confidently right
    sums = weighted_sums(logits, np.zeros((1, 2), np.int32), np.array([[0.0, 1.0]], np.float32))
    assert float(sums["weight_sum"]) == 1.0 and float(sums["correct_sum"]) == 1.0
    assert float(sums["loss_sum"]) < 1e-3


# --------------------------------------------------------------------------- token files
def tokens_source(path, T=8, **options):
    opts = {"path": str(path), "vocab_size": 100, "dtype": "uint16", **options}
    return make_source(DataConfig(source="tokens", seq_len=T, batch_size=2, options=opts))


def test_token_file_windows(tmp_path):
    path = tmp_path / "train.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    src = tokens_source(path, eval_fraction=0.2)
    assert src.splits["train"].shape == (80,) and src.splits["eval"].shape == (20,)
    b = src.batch("train", 0, 2)
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)  # arange: next token = +1
    assert b["inputs"].max() < 80 and src.batch("eval", 0, 2)["inputs"].min() >= 80

    path32 = tmp_path / "t32.bin"
    np.arange(50, dtype=np.uint32).tofile(path32)
    src = tokens_source(path32, dtype="uint32", eval_path=str(path32))
    assert src.batch("eval", 1, 2)["inputs"].dtype == np.int32


def test_token_file_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.bin"
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        tokens_source(missing)

    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(b"\x00" * 41)  # not a whole number of uint16
    with pytest.raises(ValueError, match=r"corrupt\.bin.*corrupt"):
        tokens_source(corrupt)

    short = tmp_path / "short.bin"
    np.arange(8, dtype=np.uint16).tofile(short)  # seq_len 8 needs 9 tokens
    with pytest.raises(ValueError, match=r"short\.bin.*too short"):
        tokens_source(short)

    big = tmp_path / "big.bin"
    np.full(200, 500, dtype=np.uint16).tofile(big)
    with pytest.raises(ValueError, match=r"big\.bin.*token id 500"):
        tokens_source(big)  # at open, before any batch

    # An id that appears only as an input (position 0 of the file, never a target) and
    # one in the eval file are both caught when the source opens.
    first = tmp_path / "first.bin"
    np.concatenate([[777], np.arange(99), np.arange(100)]).astype(np.uint16).tofile(first)
    with pytest.raises(ValueError, match=r"first\.bin.*token id 777 >= data\.options\.vocab_size=100 \(at index 0\)"):
        tokens_source(first)
    ok = tmp_path / "ok.bin"
    np.arange(100, dtype=np.uint16).tofile(ok)
    with pytest.raises(ValueError, match=r"big\.bin.*token id 500"):
        tokens_source(ok, eval_path=str(big))

    good = tmp_path / "good.bin"
    np.arange(100, dtype=np.uint16).tofile(good)
    with pytest.raises(ValueError, match="dtype"):
        tokens_source(good, dtype="int8")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        tokens_source(good, eval_path=str(tmp_path / "nope.bin"))


# --------------------------------------------------------------------------- registry, args
def test_a_new_source_is_one_registered_class():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Opts:
        value: int = 3

    @register_source("constant_for_test")
    class Constant(DataSource):
        Options = Opts
        vocab_size = 8

        def batch(self, split, step, batch_size):
            x = np.full((batch_size, self.config.seq_len), self.options.value, np.int32)
            return {"inputs": x, "targets": x, "weights": np.ones(x.shape, np.float32)}

    try:
        src = make_source(DataConfig(source="constant_for_test", seq_len=4, options={"value": 5}))
        assert src.batch("train", 0, 2)["inputs"].tolist() == [[5] * 4] * 2
        assert "constant_for_test" in registered_sources()
    finally:
        from train import data

        data._SOURCES.pop("constant_for_test")


def test_parse_arg_string():
    defaults = {"attn": "mha", "steps": 10, "lr": 1e-3, "fast": False}
    assert parse_arg_string("attn=gqa, steps=5,lr=0.5,fast=true", defaults) == {
        "attn": "gqa", "steps": 5, "lr": 0.5, "fast": True}
    assert parse_arg_string(None, defaults) == defaults
    with pytest.raises(ValueError, match="unknown config argument 'atn'"):
        parse_arg_string("atn=gqa", defaults)
    with pytest.raises(ValueError, match="steps='many'"):
        parse_arg_string("steps=many", defaults)
    with pytest.raises(ValueError, match="not key=value"):
        parse_arg_string("gqa", defaults)


def test_mqar_source_class_is_registered():
    assert make_source(DataConfig(source="mqar", options={"vocab_size": 64})).__class__ is MQARSource
