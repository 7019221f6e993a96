"""configs/long_context.py: every strategy gives a valid experiment (no training).

    python -m pytest tests/test_long_context.py
"""

import os

import pytest

from train import context_parallel as cpl
from train import trainer
from train.config_args import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs/long_context.py")


@pytest.mark.parametrize("strategy", sorted(cpl.STRATEGIES))
def test_config_parses_for_every_strategy(strategy):
    exp = trainer.parse_config(load_config(f"{CONFIG}:strategy={strategy},steps=2"))
    cp = exp.mesh.shape[2]
    assert exp.context_parallel.strategy == strategy and cp == 4
    # What the trainer checks only when it builds the run: the zigzag order exists and
    # the strategy's head split divides the model's heads.
    cpl.zigzag_permutation(exp.data.seq_len, cpl.STRATEGIES[strategy].zigzag_chunks(cp))
    assert exp.model.num_heads % cpl.STRATEGIES[strategy].ulysses_degree(cp, None) == 0


def test_bad_sequence_length_names_the_rule():
    with pytest.raises(ValueError, match=r"seq=1004 must divide by 2·context=8"):
        load_config(f"{CONFIG}:seq=1004")
