"""Flash attention kernels in Pallas: shared block-mask machinery, TPU and GPU backends.

Modules: ``masking`` (block classification and visit tables), ``shell`` (the one custom
VJP around every kernel: padding, row prep, mask extras, sinks, ``out_dtype``), ``tpu``
(Mosaic TPU), ``gpu_triton`` (Pallas Triton), ``gpu`` (Mosaic GPU, Hopper), ``register``
(the ``attn.core`` implementations). See README.md for the algorithm, block sizes and
limits. The float64 reference the tests compare against is ``tests/oracle.py``. Nothing
is imported here, so ``attn.core`` can import ``kernels_pallas.flash.register`` without
a cycle.
"""
