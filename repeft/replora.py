"""RepLoRA: LoRA whose factors come out of lightweight maps applied to trainable seeds.

Three forms (``RepLoRAConfig.form``):

- ``"shared"`` (default, the paper's method): within a block (one attention
  layer), the projections of a group (query and value by default) draw their
  factors from one pair of seed matrices A' (r x d_in), B' (d_out x r), each
  through its own maps: ``A_Q = g_{A,Q}(A')``, ``A_V = g_{A,V}(A')``, likewise B.
  Each map is residual and zero-initialised, ``g(M) = M + correction(M)``,
  so at init every projection's A is the seed A' (LoRA's kaiming draw) and B is
  B' = 0: the model is the base model and the gradients are LoRA's with
  the seeds tied. Projections of unequal sizes (grouped-query attention) use
  the leading rows of B' (columns of A'), sized for the group's largest
  (docs/methods/replora.md says why).
- ``"residual"``: the same maps with a seed pair per projection (issue 15's
  form, a repeft variant; LoRA plus a small per-module correction).
- ``"mlp"``: the plain ``g(M) = W2 act(W1 M + b1) + b2`` per projection. Badly
  conditioned under Adam; kept to load adapters saved before ``form`` existed.

``reparam`` picks the correction the paper analyses: ``"mlp"`` (non-linear,
``(s_M / h) W2 act(W1 M / s_M)``) or ``"linear"`` (``M L / k``). Maps act on
every vector along ``axis`` of a seed (along the rank axis, the default, each
vector has length r, so they cost ``O(r * mlp_hidden)`` whatever the model
width). The adapter matmul itself is the ordinary low-rank one, so merging and
PEFT export use the materialised A and B. In eval mode with no gradient
needed, ``factors()`` computes A and B once and reuses them while the
parameters they come from are bit-for-bit unchanged, so inference costs what
LoRA's does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import as_name_list, option
from .lora import DTYPES, LoRAConfig, inject_low_rank
from .methods import register_method
from .targeting import DEFAULT_TARGET_MODULES, matches_name, model_type

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


@dataclass
class RepLoRAConfig(LoRAConfig):
    """RepLoRA: A and B are produced by small maps from trainable seeds.

    ``form`` (see the module docstring): ``"shared"`` (default, the paper's
    shared structure), ``"residual"`` (per-projection seeds, a repeft
    variant) or ``"mlp"`` (the plain MLP, for adapters saved before ``form``).

    ``shared_modules`` (form ``"shared"``): which targeted projections of a
    block share seeds. ``None``: the architecture's query/value pair (its
    default ``target_modules``; on an architecture without one, every targeted
    projection of a block); ``"all"``: every targeted projection of a block
    (e.g. q, k, v, o); or a list of names / dotted suffixes. A block is the
    module holding the projections (``self_attn``); a targeted projection
    outside the list keeps seeds of its own.

    ``reparam``: ``"mlp"`` (non-linear, ``g(M) = M + (s_M / h) W2 act(W1 M / s_M)``,
    s_M the RMS of the seed, h = ``mlp_hidden``, no biases, W2 = 0) or
    ``"linear"`` (``g(M) = M + M L / k``, L = 0, k the vectors' length).
    Both are the identity at init, so the adapter starts as LoRA (outputs and
    gradients) and trains at LoRA's rates. ``axis``: ``"rank"`` (each column
    of A, each row of B is a length-r vector; cost independent of model width)
    or ``"feature"`` (each row of A / column of B). ``share_mlp`` shares W1
    between g_A and g_B of a projection.

    >>> RepLoRAConfig(r=8, mlp_hidden=32).form
    'shared'
    """

    method: ClassVar[str] = "replora"
    peft_type: ClassVar[str | None] = None  # not a PEFT method: it exports to PEFT as plain LoRA (export_peft)
    saved_before: ClassVar[dict[str, Any]] = {"form": "mlp"}

    mlp_hidden: int = option(32, minimum=1)
    activation: str = option("tanh", choices=tuple(ACTIVATIONS))
    share_mlp: bool = False
    axis: str = option("rank", choices=("rank", "feature"))
    form: str = option("shared", choices=("shared", "residual", "mlp"))
    reparam: str = option("mlp", choices=("mlp", "linear"))
    shared_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form == "mlp" and self.reparam != "mlp":
            raise ValueError(f"reparam={self.reparam!r} needs form='shared' or 'residual'; form='mlp' is the plain MLP")
        if isinstance(self.shared_modules, (list, tuple)):
            self.shared_modules = as_name_list("shared_modules", self.shared_modules)
        elif isinstance(self.shared_modules, str) and self.shared_modules != "all":
            raise ValueError(f"shared_modules must be None, 'all' or a list of module names, got {self.shared_modules!r}")


class RepLoRAFactors(nn.Module):
    """One projection's maps g_A, g_B, turning seeds into its A (r x d_in) and B (d_out x r).

    The seeds live in one module of each group, the ``seed_owner`` (None: this
    one), sized ``seed_features`` = (d_in, d_out) of the group's largest; the
    other members hold a plain reference to it, not a submodule, so state
    dicts, parameter counts and FSDP units see each seed once.

    >>> f = RepLoRAFactors(64, 64, RepLoRAConfig(r=4))
    >>> A, B = f.factors()  # A == f.lora_A_seed and B == 0 at init
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: RepLoRAConfig,
        device=None,
        *,
        seed_owner: RepLoRAFactors | None = None,
        seed_features: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        r, hidden = config.r, config.mlp_hidden
        kw = {"device": device, "dtype": DTYPES[config.dtype]}
        self.in_features, self.out_features = in_features, out_features
        self.axis = config.axis
        self.residual = config.form != "mlp"
        self.linear = config.reparam == "linear"
        # Length of the vectors each map transforms.
        a_dim, b_dim = (r, r) if self.axis == "rank" else (in_features, out_features)
        if config.share_mlp and a_dim != b_dim:
            raise ValueError(
                f"share_mlp with axis='feature' needs d_in == d_out, got {in_features} and {out_features}; "
                "use axis='rank' or share_mlp=False"
            )
        # Seeds first, then the maps: the random draws come in the order LoRA's (A) and the earlier
        # RepLoRA's made them, so a seed gives A' LoRA's first A and form="mlp" its old init.
        if seed_owner is None:
            seed_in, seed_out = seed_features or (in_features, out_features)
            self._make_seeds(r, seed_in, seed_out, kw)
        # A plain attribute, not a submodule: the owner registers the seeds once.
        object.__setattr__(self, "_seed_owner", seed_owner)
        if self.linear:
            self.map_A = nn.Linear(a_dim, a_dim, bias=False, **kw)
            self.map_B = nn.Linear(b_dim, b_dim, bias=False, **kw)
            with torch.no_grad():
                nn.init.zeros_(self.map_A.weight)
                nn.init.zeros_(self.map_B.weight)
        else:
            self._make_mlps(a_dim, b_dim, hidden, config, kw)
        if not self.residual:
            with torch.no_grad():
                self._match_lora_spread(in_features)
        self.scaling = config.scaling
        self.dropout_p = config.lora_dropout
        self.kernel = config.kernel
        self._cache: tuple[tuple, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _make_seeds(self, r: int, d_in: int, d_out: int, kw: dict) -> None:
        self.lora_A_seed = nn.Parameter(torch.empty(r, d_in, **kw))
        self.lora_B_seed = nn.Parameter(torch.empty(d_out, r, **kw))
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

    def _make_mlps(self, a_dim: int, b_dim: int, hidden: int, config: RepLoRAConfig, kw: dict) -> None:
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
            # g_B's output layer is zero, so B = 0 and the model starts as the base model (all forms);
            # in the residual forms g_A's is zero too, so A = A_seed.
            nn.init.zeros_(self.out_B.weight)
            if self.residual:
                nn.init.zeros_(self.out_A.weight)
            else:
                nn.init.zeros_(self.out_B.bias)

    def _match_lora_spread(self, in_features: int) -> None:
        # Give the materialised A the spread of LoRA's kaiming-uniform A (std 1/sqrt(3 d_in)),
        # so lora_alpha and learning rates mean the same for both methods.
        nn.init.zeros_(self.out_A.bias)
        spread = self._compute()[0].float().std()
        self.out_A.weight.mul_(1.0 / math.sqrt(3 * in_features) / spread.clamp_min(1e-12))

    @property
    def seed_owner(self) -> RepLoRAFactors:
        """The group member that holds the seeds (this module unless it shares another's)."""
        return self if self._seed_owner is None else self._seed_owner

    def _g(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        """g applied to each row of ``rows`` (the vectors along ``axis``); ``side`` is "A" or "B"."""
        if self.linear:
            # Adam moves each of L's k entries in a row by about lr per step, in step with each
            # other: divided by k, the correction grows by at most about lr relative to the seed.
            linear = getattr(self, f"map_{side}")
            return rows + linear(rows) / linear.in_features
        hidden = self.hidden if hasattr(self, "hidden") else getattr(self, f"hidden_{side}")
        out = getattr(self, f"out_{side}")
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
        owner = self.seed_owner
        # This projection's share of the group's seeds: the leading columns of A' and rows of B'.
        seed_A = owner.lora_A_seed[:, : self.in_features]
        seed_B = owner.lora_B_seed[: self.out_features]
        if self.axis == "rank":
            return self._g(seed_A.T, "A").T, self._g(seed_B, "B")
        return self._g(seed_A, "A"), self._g(seed_B.T, "B").T

    def _inputs(self) -> list[torch.Tensor]:
        """The parameters the factors are computed from: this module's, one level down, and the seeds."""
        # parameters() walks the module tree and would cost more than the lookup it guards.
        params = [p for m in (self, *self._modules.values()) for p in m._parameters.values() if p is not None]
        if self._seed_owner is not None:
            params += [self._seed_owner.lora_A_seed, self._seed_owner.lora_B_seed]
        return params

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B); in eval mode without gradients, computed once and reused while the parameters are unchanged."""
        if self.training or torch.compiler.is_compiling():
            return self._compute()
        params = self._inputs()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._cache = None  # a training step in eval mode may follow
            return self._compute()
        # Reused only if every input is bit-for-bit what it was: an optimizer step (fused kernels
        # included), copy_, a write through .data (which bumps no version counter), load_state_dict,
        # .to() all show up here, whatever they did or did not tell autograd.
        layout = tuple((p.shape, p.dtype, p.device) for p in params)
        # Plain tensors even inside torch.inference_mode(): a later autograd pass may save them.
        with torch.inference_mode(False), torch.no_grad():
            snapshot = torch.cat([p.reshape(-1) for p in params])
            if self._cache is None or self._cache[0] != layout or not torch.equal(self._cache[1], snapshot):
                self._cache = (layout, snapshot, self._compute())
        return self._cache[2]

    def train(self, mode: bool = True) -> RepLoRAFactors:
        self._cache = None
        return super().train(mode)


def share_groups(model, paths: list[str], config: RepLoRAConfig) -> list[list[str]]:
    """The targeted ``paths`` grouped by the seeds they share, in model order (groups of one unless shared)."""
    if config.form != "shared":
        return [[p] for p in paths]
    names = config.shared_modules
    if names is None:
        names = DEFAULT_TARGET_MODULES.get(model_type(model), "all")
    groups: dict[str, list[str]] = {}
    for path in paths:
        shares = names == "all" or any(matches_name(path, n) for n in names)
        # A block is the module holding the projections; a projection outside the group is its own.
        key = path.rpartition(".")[0] + "." if shares else path
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def replora_factors(model, layers: dict, config: RepLoRAConfig) -> dict[str, RepLoRAFactors]:
    """The factors of every targeted layer (``{path: LoRALinear}``), seeds owned by each group's first member."""
    factors = {}
    for group in share_groups(model, list(layers), config):
        seed_features = (max(layers[p].in_features for p in group), max(layers[p].out_features for p in group))
        owner = None
        for path in group:
            layer = layers[path]
            factors[path] = RepLoRAFactors(
                layer.in_features, layer.out_features, config, seed_owner=owner, seed_features=seed_features
            )
            if owner is None:
                owner = factors[path]
    return factors


@register_method(
    RepLoRAConfig, families=DEFAULT_TARGET_MODULES, identity_at_init=True, generates_with_cache=True, vision_only=False,
    example={"r": 4, "lora_alpha": 8, "mlp_hidden": 8},
)
def inject_replora(model, name: str, config: RepLoRAConfig) -> None:
    inject_low_rank(model, name, config, lambda layers: replora_factors(model.get_base_model(), layers, config))
