"""Training: ``python -m train --config configs/x.py[:args] --workdir runs/x``.

``train_and_evaluate(config, workdir)`` is the one entry point; see ``train/trainer.py``.
"""

from train.trainer import NonFiniteLossError, train_and_evaluate

__all__ = ["NonFiniteLossError", "train_and_evaluate"]
