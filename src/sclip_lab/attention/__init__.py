"""Last-block variants (docs/protocol.md §2–3): the registry and every registered method.

``core`` holds the contract's runtime side (``AttentionInputs``, ``register_attention``,
``ATTENTIONS``), the shared primitives, the score-term recipe and the named presets;
``csa`` SCLIP's correlative self-attention and its projection sets. Each further method
lives in a module of its own here and registers itself on import, below.
"""

# Each import registers that module's methods.
from sclip_lab.attention import csa as _csa  # noqa: F401
from sclip_lab.attention import gem as _gem  # noqa: F401
from sclip_lab.attention import proxy as _proxy  # noqa: F401
from sclip_lab.attention import resclip as _resclip  # noqa: F401
from sclip_lab.attention import scclip as _scclip  # noqa: F401
from sclip_lab.attention import surgery as _surgery  # noqa: F401
from sclip_lab.attention import trase as _trase  # noqa: F401

# isort: split
# Methods added later register after the others, so that the summary's knob columns keep
# their order and new ones come last (records.summary_of).
from sclip_lab.attention import sfp as _sfp  # noqa: F401

# isort: split
from sclip_lab.attention import pearl as _pearl  # noqa: F401

# isort: split
from sclip_lab.attention.core import (
    ATTENTIONS,
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_PROJECTION,
    HEAD_TEMPERATURE,
    TERMS,
    AttentionInputs,
    around,
    attention_qkv,
    early,
    gaussian_grid_bias,
    get_variant,
    grid_coords,
    hard_max_attention,
    local,
    maskclip,
    merge_heads,
    neighbourhood_mask,
    neighbourhood_scale,
    register_attention,
    score_attention,
    score_term,
    sharpen,
    softmax_attention,
    split_heads,
    vanilla,
)
from sclip_lab.attention.csa import (
    PROJECTIONS,
    Projection,
    check_projection,
    csa,
    csa_projections,
    project,
    qkv_weights,
    random_projections,
)

__all__ = [
    "ATTENTIONS", "COMBINES", "DEFAULT_COMBINE", "DEFAULT_PROJECTION", "HEAD_TEMPERATURE",
    "PROJECTIONS", "TERMS", "AttentionInputs", "Projection", "around", "attention_qkv",
    "check_projection", "csa",
    "csa_projections", "early",
    "gaussian_grid_bias", "get_variant", "grid_coords", "hard_max_attention", "local",
    "maskclip", "merge_heads", "neighbourhood_mask", "neighbourhood_scale", "project",
    "qkv_weights", "random_projections", "register_attention", "score_attention",
    "score_term", "sharpen", "softmax_attention", "split_heads", "vanilla",
]
