"""Linear and recurrent attention: Gated DeltaNet, GLA, KDA, Lightning (issue 21).

Pure functions with FLA's argument names in attnlab's ``[B, T, N, H]`` layout
(``gated_delta_rule``, ``gla``, ``kda``, ``lightning``), each with a naive scan and a
chunked form with a custom VJP (``attn/linear/_chunked.py``), and the registered layers
"gdn", "gla", "kda", "lightning" (``attn/linear/_layer.py``). See docs/linear.md.

Example:
  >>> import jax.numpy as jnp
  >>> from attn.linear import gated_delta_rule
  >>> q = k = jnp.ones((1, 4, 2, 8)) / 8 ** 0.5; v = jnp.ones((1, 4, 2, 3))
  >>> o, S = gated_delta_rule(q, k, v, jnp.zeros((1, 4, 2)), jnp.ones((1, 4, 2)), output_final_state=True)
  >>> o.shape, S.shape
  ((1, 4, 2, 3), (1, 2, 8, 3))
"""

from attn.linear.gdn import gated_delta_rule  # noqa: E402  (each import registers a mechanism)
from attn.linear.gla import gla  # noqa: E402
from attn.linear.kda import kda  # noqa: E402
from attn.linear.lightning import lightning, lightning_slopes  # noqa: E402

__all__ = ["gated_delta_rule", "gla", "kda", "lightning", "lightning_slopes"]
