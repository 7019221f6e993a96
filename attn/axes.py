"""Logical axis names: the one vocabulary for parameter and activation sharding.

Modules annotate parameters with these names (``nn.with_logical_partitioning``) and
activations with ``nn.with_logical_constraint``; the config's rules map them onto the
mesh axes ``("data", "fsdp", "context", "tensor")``. Modules never see the mesh.
"""

BATCH = "batch"          # B
LENGTH = "length"        # T / S (sequence; the context-parallel axis)
EMBED = "embed"          # D
HEADS = "heads"          # N
KV_HEADS = "kv_heads"    # K
HEAD_DIM = "head_dim"    # H / E
MLP = "mlp"              # F
VOCAB = "vocab"          # V
LATENT = "latent"        # L (MLA / CCA latents)
LAYERS = "layers"        # stacked layers under nn.scan

# Default rules: (logical name, mesh axis or axes or None). Configs may override.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, "context"),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (HEAD_DIM, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LATENT, None),
    (LAYERS, None),
)
