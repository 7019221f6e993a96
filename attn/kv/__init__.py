"""KV-cache policies: which cached tokens (or key channels) each layer and head keeps.

``policy.py`` holds the interface (``Observation`` -> ``Selection``), the score-policy
base and the registry; ``head_cache.py`` the per-(row, kv head) paged cache the policies
fill; one file per policy (``streaming.py``, ``snapkv.py``, ...). docs/kv_policies.md
describes each with its paper and its knobs.
"""
