"""RepLoRA: LoRA whose factors come out of lightweight MLPs.

``A = g_A(A_seed)``, ``B = g_B(B_seed)`` with ``g(M) = W2 act(W1 M + b1) + b2``
applied to every vector along the chosen axis of the seed. Along the rank
axis (the default) each vector has length r, so the MLPs cost
``O(r * mlp_hidden)`` parameters whatever the model width. The MLPs run once
per forward on the r x d seeds, never on tokens; the adapter matmul itself is
the ordinary low-rank one, so merging and PEFT export use the materialised
A and B.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import RepLoRAConfig
from .lora import DTYPES, inject_low_rank
from .methods import register_method
from .targeting import DEFAULT_TARGET_MODULES

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


class RepLoRAFactors(nn.Module):
    """Seeds plus the MLPs g_A, g_B that turn them into LoRA's A (r x d_in) and B (d_out x r)."""

    def __init__(self, in_features: int, out_features: int, config: RepLoRAConfig, device=None) -> None:
        super().__init__()
        r, hidden = config.r, config.mlp_hidden
        kw = {"device": device, "dtype": DTYPES[config.dtype]}
        self.axis = config.axis
        # Length of the vectors each MLP transforms.
        a_dim, b_dim = (r, r) if self.axis == "rank" else (in_features, out_features)
        if config.share_mlp and a_dim != b_dim:
            raise ValueError(
                f"share_mlp with axis='feature' needs d_in == d_out, got {in_features} and {out_features}; "
                "use axis='rank' or share_mlp=False"
            )
        self.lora_A_seed = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B_seed = nn.Parameter(torch.empty(out_features, r, **kw))
        # Unit-variance seeds, so the MLPs' pre-activations W1 v are of order one and dominate
        # the hidden bias. With LoRA's tiny kaiming scale every hidden vector was nearly act(b1):
        # all rows of A (and later of B) came out almost equal, an effective rank of ~1.5 of 8.
        nn.init.normal_(self.lora_A_seed)
        nn.init.normal_(self.lora_B_seed)
        if config.share_mlp:
            self.hidden = nn.Linear(a_dim, hidden, **kw)
        else:
            self.hidden_A = nn.Linear(a_dim, hidden, **kw)
            self.hidden_B = nn.Linear(b_dim, hidden, **kw)
        self.act = ACTIVATIONS[config.activation]()
        self.out_A = nn.Linear(hidden, a_dim, **kw)
        self.out_B = nn.Linear(hidden, b_dim, **kw)
        # The last layer of g_B is zero, so B = 0 and the model starts as the base model.
        nn.init.zeros_(self.out_B.weight)
        nn.init.zeros_(self.out_B.bias)
        self._match_lora_init(in_features)
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = config.kernel

    @torch.no_grad()
    def _match_lora_init(self, in_features: int) -> None:
        # Give the materialised A the spread of LoRA's kaiming-uniform A (std 1/sqrt(3 d_in)),
        # so lora_alpha and learning rates mean the same for both methods.
        nn.init.zeros_(self.out_A.bias)
        spread = self.factors()[0].float().std()
        self.out_A.weight.mul_(1.0 / math.sqrt(3 * in_features) / spread.clamp_min(1e-12))

    def _g(self, rows: torch.Tensor, hidden: nn.Linear, out: nn.Linear) -> torch.Tensor:
        return out(self.act(hidden(rows)))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_A = self.hidden if hasattr(self, "hidden") else self.hidden_A
        hidden_B = self.hidden if hasattr(self, "hidden") else self.hidden_B
        if self.axis == "rank":
            lora_A = self._g(self.lora_A_seed.T, hidden_A, self.out_A).T
            lora_B = self._g(self.lora_B_seed, hidden_B, self.out_B)
        else:
            lora_A = self._g(self.lora_A_seed, hidden_A, self.out_A)
            lora_B = self._g(self.lora_B_seed.T, hidden_B, self.out_B).T
        return lora_A, lora_B


@register_method(
    "replora", families=DEFAULT_TARGET_MODULES, identity_at_init=True, generates_with_cache=True, vision_only=False
)
def inject_replora(model, name: str, config: RepLoRAConfig) -> None:
    inject_low_rank(
        model, name, config, lambda layer: RepLoRAFactors(layer.in_features, layer.out_features, config)
    )
