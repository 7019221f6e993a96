"""Converting pretrained attention into other mechanisms, and measuring what survives.

One file per method, each with a ``python -m`` entry point that converts a checkpoint,
measures it and writes an attnlab (native) directory that ``configs/finetune.py``
heals (``init=DIR``):

  transmla   GQA -> MLA (RoRoPE, FreqFold, BKV-PCA; ``models.transmla_lm`` does the maths)

``common`` holds the measurements every method reports: held-out perplexity on the
embedded text and KV-cache bytes per token. Results and the report: ``docs/conversion.md``.
"""
