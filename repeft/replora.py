"""RepLoRA: LoRA whose factors come out of lightweight MLPs applied to trainable seeds.

Two forms (``RepLoRAConfig.form``), both applied to every vector along the
chosen axis of a seed (along the rank axis, the default, each vector has
length r, so the MLPs cost ``O(r * mlp_hidden)`` whatever the model width):

- ``"residual"`` (default): ``g(M) = M + (s_M / h) W2 act(W1 M / s_M)``, no biases,
  W2 zero and the seeds initialised as LoRA's A and B, with ``s_M`` the RMS of
  the seed and h the MLP's width. At init A = A_seed and B = B_seed = 0 with
  identity Jacobians, so the adapter *is* LoRA (outputs and gradients), and
  the MLP is a correction that grows from zero, relative to the seed, by at
  most about lr per Adam step.
- ``"mlp"``: the plain ``g(M) = W2 act(W1 M + b1) + b2``. Badly conditioned under
  Adam (docs/methods/replora.md has the measurements); kept to load adapters
  saved before the residual form existed and to compare against.

The MLPs run on the r x d seeds, never on tokens; the adapter matmul itself is
the ordinary low-rank one, so merging and PEFT export use the materialised A
and B. In eval mode with no gradient needed, ``factors()`` computes A and B
once and returns the cached pair until a parameter changes or ``train()`` is
called, so inference costs what LoRA's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import option
from .lora import DTYPES, LoRAConfig, inject_low_rank
from .methods import register_method
from .targeting import DEFAULT_TARGET_MODULES

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


@dataclass
class RepLoRAConfig(LoRAConfig):
    """RepLoRA: A and B are produced by small MLPs from trainable seeds.

    ``A = g_A(A_seed)`` and ``B = g_B(B_seed)``, with g applied to every vector
    along ``axis``: ``"rank"`` (each column of A, each row of B is a length-r
    vector; cost independent of model width) or ``"feature"`` (each row of A /
    column of B is transformed; W1 is ``mlp_hidden x d``). ``form`` picks g:

    - ``"residual"`` (default): ``g(M) = M + (s_M / h) W2 act(W1 M / s_M)``, s_M the RMS
      of the seed M, h = ``mlp_hidden``, no biases, W2 = 0 and the seeds initialised
      as LoRA's A and B. It is exactly LoRA at init, gradients included, and trains
      at LoRA's rates.
    - ``"mlp"``: ``g(M) = W2 act(W1 M + b1) + b2`` with unit-normal seeds and g_B's
      output layer zero. Trains worse than LoRA (poorly conditioned under Adam);
      kept for adapters saved before ``form`` existed and for comparisons.

    ``share_mlp`` shares the hidden layer W1 (and b1) between g_A and g_B; each
    keeps its own output layer, the one that starts at zero.

    >>> RepLoRAConfig(r=8, mlp_hidden=32).form
    'residual'
    """

    method: ClassVar[str] = "replora"
    saved_before: ClassVar[dict[str, Any]] = {"form": "mlp"}

    mlp_hidden: int = option(32, minimum=1)
    activation: str = option("tanh", choices=tuple(ACTIVATIONS))
    share_mlp: bool = False
    axis: str = option("rank", choices=("rank", "feature"))
    form: str = option("residual", choices=("residual", "mlp"))


class RepLoRAFactors(nn.Module):
    """Seeds plus the MLPs g_A, g_B that turn them into LoRA's A (r x d_in) and B (d_out x r).

    >>> f = RepLoRAFactors(64, 64, RepLoRAConfig(r=4))
    >>> A, B = f.factors()  # A == f.lora_A_seed and B == 0 at init (form="residual")
    """

    def __init__(self, in_features: int, out_features: int, config: RepLoRAConfig, device=None) -> None:
        super().__init__()
        r, hidden = config.r, config.mlp_hidden
        kw = {"device": device, "dtype": DTYPES[config.dtype]}
        self.axis = config.axis
        self.residual = config.form == "residual"
        # Length of the vectors each MLP transforms.
        a_dim, b_dim = (r, r) if self.axis == "rank" else (in_features, out_features)
        if config.share_mlp and a_dim != b_dim:
            raise ValueError(
                f"share_mlp with axis='feature' needs d_in == d_out, got {in_features} and {out_features}; "
                "use axis='rank' or share_mlp=False"
            )
        # Seeds first, then the MLPs: the random draws come in the order LoRA's (A) and the earlier
        # RepLoRA's made them, so a seed gives the residual form LoRA's first A and form="mlp" its old init.
        self.lora_A_seed = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B_seed = nn.Parameter(torch.empty(out_features, r, **kw))
        with torch.no_grad():
            if self.residual:  # LoRA's own init: nn.Linear's kaiming-uniform A, zero B
                nn.init.kaiming_uniform_(self.lora_A_seed, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B_seed)
            else:
                # Unit-variance seeds, so the MLPs' pre-activations W1 v are of order one and dominate the
                # hidden bias. With LoRA's tiny kaiming scale every hidden vector was nearly act(b1): all
                # rows of A (and later of B) came out almost equal, an effective rank of ~1.5 of 8.
                nn.init.normal_(self.lora_A_seed)
                nn.init.normal_(self.lora_B_seed)
        # An output bias would add one vector to every column of A: a rank-one part that only sees sum(x).
        bias = not self.residual
        if config.share_mlp:
            self.hidden = nn.Linear(a_dim, hidden, bias=bias, **kw)
        else:
            self.hidden_A = nn.Linear(a_dim, hidden, bias=bias, **kw)
            self.hidden_B = nn.Linear(b_dim, hidden, bias=bias, **kw)
        self.act = ACTIVATIONS[config.activation]()
        self.out_A = nn.Linear(hidden, a_dim, bias=bias, **kw)
        self.out_B = nn.Linear(hidden, b_dim, bias=bias, **kw)
        with torch.no_grad():
            # g_B's output layer is zero, so B = 0 and the model starts as the base model (both forms);
            # in the residual form g_A's is zero too, so A = A_seed.
            nn.init.zeros_(self.out_B.weight)
            if self.residual:
                nn.init.zeros_(self.out_A.weight)
            else:
                nn.init.zeros_(self.out_B.bias)
                self._match_lora_spread(in_features)
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = config.kernel
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _match_lora_spread(self, in_features: int) -> None:
        # Give the materialised A the spread of LoRA's kaiming-uniform A (std 1/sqrt(3 d_in)),
        # so lora_alpha and learning rates mean the same for both methods.
        nn.init.zeros_(self.out_A.bias)
        spread = self._compute()[0].float().std()
        self.out_A.weight.mul_(1.0 / math.sqrt(3 * in_features) / spread.clamp_min(1e-12))

    def _g(self, rows: torch.Tensor, hidden: nn.Linear, out: nn.Linear) -> torch.Tensor:
        if not self.residual:
            return out(self.act(hidden(rows)))
        # The seed's RMS makes the correction relative to the seed, g(c M) = c g(M), and gives the MLP
        # order-one inputs, whether the seed is A's (1/sqrt(3 d_in)) or B's (0 at init, then growing
        # at Adam's pace; the floor keeps B = 0 finite). The 1/h: Adam moves each entry of W2 by about
        # lr per step and a shared weight's updates line up, so h of them could move A by h * lr
        # relative to its size; divided by h the correction grows by at most lr, and the MLP's
        # Jacobian stays close to the identity, LoRA's, over a run (docs/methods/replora.md).
        rms = rows.pow(2).mean().clamp_min(torch.finfo(rows.dtype).tiny).sqrt()
        return rows + rms / out.in_features * out(self.act(hidden(rows / rms)))

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_A = self.hidden if hasattr(self, "hidden") else self.hidden_A
        hidden_B = self.hidden if hasattr(self, "hidden") else self.hidden_B
        if self.axis == "rank":
            lora_A = self._g(self.lora_A_seed.T, hidden_A, self.out_A).T
            lora_B = self._g(self.lora_B_seed, hidden_B, self.out_B)
        else:
            lora_A = self._g(self.lora_A_seed, hidden_A, self.out_A)
            lora_B = self._g(self.lora_B_seed.T, hidden_B, self.out_B).T
        return lora_A, lora_B

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B); in eval mode without gradients, computed once and reused until a parameter changes."""
        if self.training or torch.compiler.is_compiling():
            return self._compute()
        # The seeds and the MLPs' Linears, one level down: parameters() walks the module tree and
        # would cost more than the lookup it guards (a decode loop calls this for every token).
        params = [p for m in (self, *self._modules.values()) for p in m._parameters.values() if p is not None]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._compute()
        # Every in-place write (optimizer step, copy_, load_state_dict, load_adapter_tensors) bumps
        # a tensor's version; .to() and .data = ... give it new storage. Writes through .data are
        # invisible here: call train() (or eval() after it) to drop the cache after those.
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if self._cache is None or self._cache[0] != key:
            # Plain tensors even inside torch.inference_mode(): a later autograd pass may save them.
            with torch.inference_mode(False), torch.no_grad():
                self._cache = (key, self._compute())
        return self._cache[1]

    def train(self, mode: bool = True) -> RepLoRAFactors:
        self._cache = None
        return super().train(mode)


@register_method(
    RepLoRAConfig, families=DEFAULT_TARGET_MODULES, identity_at_init=True, generates_with_cache=True, vision_only=False,
    example={"r": 4, "lora_alpha": 8, "mlp_hidden": 8},
)
def inject_replora(model, name: str, config: RepLoRAConfig) -> None:
    inject_low_rank(
        model, name, config, lambda layer: RepLoRAFactors(layer.in_features, layer.out_features, config)
    )
