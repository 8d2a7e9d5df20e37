"""VPT (Jia et al., 2022): learned prompt tokens after the class token of a ViT-family encoder.

VPT-deep gives every encoder layer its own prompts P_l (n_prompt x d), which
replace the previous layer's prompt outputs; VPT-shallow inserts P_0 before
layer 0 only and lets the layers carry it. The tokens are spliced in by the
hooks in ``visual_prompts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .methods import register_method
from .visual_prompts import VIT_FAMILIES, StaticPrompts, VisualPromptConfig, attach_prompts, patch_fan_in, vit_backbone


@dataclass
class VPTConfig(VisualPromptConfig):
    """VPT (Jia et al., 2022): free prompt tokens P_l (n_prompt x d) inserted after the class token.

    ``deep=True`` (VPT-deep) gives every encoder layer its own P_l; ``deep=False``
    (VPT-shallow) inserts P_0 before layer 0 only and lets the layers carry it.

    >>> VPTConfig(n_prompt=10).deep
    True
    """

    method: ClassVar[str] = "vpt"

    deep: bool = True


@register_method(
    VPTConfig, families=VIT_FAMILIES, identity_at_init=False, generates_with_cache=False, vision_only=True,
    example={"n_prompt": 3},
)
def inject_vpt(model, adapter_name: str, config: VPTConfig) -> None:
    _, backbone = vit_backbone(model.get_base_model())
    c = backbone.config
    depth = c.num_hidden_layers if config.deep else 1
    attach_prompts(
        model, adapter_name, StaticPrompts(depth, config.n_prompt, c.hidden_size, patch_fan_in(c), config.prompt_dropout)
    )
