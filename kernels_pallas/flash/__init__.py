"""Flash attention kernels in Pallas: shared block-mask machinery, TPU and GPU backends.

Modules: ``masking`` (block classification and visit tables), ``reference`` (the
``(o, lse)`` reference), ``tpu`` (Mosaic TPU), ``gpu_triton`` (Pallas Triton),
``register`` (the ``attn.core`` implementations). See README.md for the algorithm,
block sizes and limits. Nothing is imported here, so ``attn.core`` can import
``kernels_pallas.flash.register`` without a cycle.
"""
