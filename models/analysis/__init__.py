"""Attention-head analysis on real models: capture, needles, retrieval heads, ablation, maps.

* ``capture``: ``HeadIntercept``, a router at the op contract (``attn.core.route_attention``)
  that records per-head probabilities and outputs and ablates / patches heads, with no copy
  of the model; ``unscan`` converts a scanned checkpoint so calls arrive per layer.
* ``needle``: deterministic needle-in-a-haystack cases (``make_cases``, ``NeedleCase.score``).
* ``retrieval``: Wu et al.'s retrieval-head score; ``python -m models.analysis.retrieval``.
* ``ablation``: accuracy with top-k vs random heads ablated, activation patching;
  ``python -m models.analysis.ablation``.
* ``maps``: attention-map PNGs of chosen heads; ``python -m models.analysis.maps``.

See docs/analysis.md.

Example:
  >>> from models.analysis import capture, needle
  >>> capture.InterceptSpec(ablate=[(0, 1)]).layers
  frozenset({0})
"""
