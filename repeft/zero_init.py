"""Zero-initialized attention (LLaMA-Adapter) with linear and non-linear prompts.

In each of the top L attention layers, n prompt vectors P_l (n x hidden) go
through the layer's own frozen key and value projections (and the model's key
norm, if any), without rotary position: ``K_P = W_k P_l``, ``V_P = W_v P_l``. Every query attends
to them with a softmax of its own, and the result, gated per head by
``tanh(g_{l,h})``, is added to the ordinary attention output before the
output projection (so W_o's bias is applied once)::

    out = attn(q, K_X, V_X) + tanh(g_l) * softmax(scaling * q K_P^T) V_P

``g = 0`` at init, so the wrapped model computes exactly the base model.
Linear prompts: P_l is a free parameter. Non-linear prompts come out of one
small network shared by all layers, in one of the paper's code's two variants:
"hypermodel" (one code per layer, all its prompts at once, starting near zero)
or "deepshare" (one code per prompt, row by row).

``gating="none"`` is the paper's baseline, vanilla attention: no gate, the
prompt keys join the tokens' keys in one softmax (prompt tuning through the
frozen projections), so the model differs from the base model from the start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .attention import FAMILIES, AttentionAdapter, AttentionCall, Geometry, add_attention_adapter
from .config import AdapterConfig, option
from .methods import register_method
from .replora import ACTIVATIONS


@dataclass
class ZeroInitConfig(AdapterConfig):
    """Zero-initialized attention (LLaMA-Adapter) with linear or non-linear prompts.

    In the top ``n_layers`` attention layers (``None``: all), ``n_prompt`` prompt
    vectors P_l are projected by the layer's frozen key/value projections (no
    rotary); each query attends to them with a separate softmax whose output is
    scaled by ``tanh(g_{l,h})`` per layer and head, ``g = 0`` at init, and added
    to the ordinary attention output. ``prompt_type="linear"``: P_l is a free
    parameter. ``"nonlinear"``: a network (``mlp_hidden`` wide, ``activation``)
    shared by all layers makes the prompts, as one of the paper's code's two
    variants (``prompt_network``):

    - ``"hypermodel"`` (default, the paper's non-linear script): one code e_l
      (``code_dim``) per layer, ``vec(P_l) = W2 act(W1 e_l + b1) + b2`` gives all
      n_prompt prompts at once; W2 starts tiny, so the prompts start near zero.
    - ``"deepshare"``: one code per prompt, ``P_l = W2 act(W1 E_l + b1) + b2`` row by
      row (E_l is ``n_prompt x code_dim``), W2 scaled so the prompts start at unit
      spread like linear prompts.

    ``gating="none"``: the baseline the paper calls vanilla attention, no gate
    and the prompts joined into the tokens' own softmax (not the base model at
    init).

    >>> ZeroInitConfig(n_prompt=10, n_layers=2, prompt_type="nonlinear").prompt_network
    'hypermodel'
    """

    method: ClassVar[str] = "zero_init"
    # Non-linear prompts saved before prompt_network existed were deepshare ones (GELU, 128 wide).
    saved_before: ClassVar[dict[str, Any]] = {"prompt_network": "deepshare"}

    n_prompt: int = option(10, minimum=1)
    n_layers: int | None = option(None, minimum=1)
    prompt_type: str = option("linear", choices=("linear", "nonlinear"))
    prompt_network: str = option("hypermodel", choices=("hypermodel", "deepshare"))
    code_dim: int = option(64, minimum=1)
    mlp_hidden: int = option(64, minimum=1)
    activation: str = option("relu", choices=tuple(ACTIVATIONS))
    gating: str = option("zero_init", choices=("zero_init", "none"))


class ZeroInitAdapter(AttentionAdapter):
    """Gates and the gated prompt attention; subclasses say where the prompts come from."""

    def __init__(self, geometry: Geometry, config: ZeroInitConfig) -> None:
        super().__init__()
        n_layers = config.n_layers or geometry.n_layers
        if n_layers > geometry.n_layers:
            raise ValueError(f"n_layers={n_layers} but the model has only {geometry.n_layers} attention layers")
        self.n_layers = n_layers
        self.first_layer = geometry.n_layers - n_layers
        self.gated = config.gating == "zero_init"
        if self.gated:
            self.gates = nn.Parameter(torch.zeros(n_layers, geometry.heads))

    def layer_prompts(self, index: int) -> torch.Tensor:
        """Prompts ``(n_prompt, hidden)`` of the ``index``-th adapted layer (counted from the first one)."""
        raise NotImplementedError

    def attend(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = call.layer - self.first_layer
        if index < 0:
            return call.base(call.key, call.value, call.mask)
        query = call.query
        keys, values = call.project_kv(self.layer_prompts(index).to(query.dtype))
        if not self.gated:  # vanilla attention: the prompts are extra keys in the tokens' softmax
            return call.base_with_prefix(keys, values)
        out, weights = call.base(call.key, call.value, call.mask)
        values = values.repeat_interleave(query.shape[1] // values.shape[0], dim=0)  # grouped-query attention
        # A softmax over the prompts alone, of logits scored (and soft-capped) as the model scores its keys:
        # padding, causality and sliding windows concern only the tokens.
        probs = torch.softmax(call.scores(keys), dim=-1, dtype=torch.float32).to(query.dtype)
        probs = nn.functional.dropout(probs, p=call.dropout, training=call.module.training)
        prompt_out = torch.einsum("bhqn,hnd->bqhd", probs, values)
        gate = torch.tanh(self.gates[index]).to(query.dtype).view(1, 1, -1, 1)
        return out + gate * prompt_out, weights


class LinearPrompts(ZeroInitAdapter):
    """Free prompts, N(0, 1) like LLaMA-Adapter's prompt embedding."""

    def __init__(self, geometry: Geometry, config: ZeroInitConfig) -> None:
        super().__init__(geometry, config)
        self.prompts = nn.Parameter(torch.randn(self.n_layers, config.n_prompt, geometry.hidden_size))

    def layer_prompts(self, index: int) -> torch.Tensor:
        return self.prompts[index]


class DeepSharePrompts(ZeroInitAdapter):
    """``P_l = W2 act(W1 E_l + b1) + b2`` row by row: one network for all layers over per-prompt codes.

    The paper's code's "deepshare" variant. W2 is rescaled once so the initial
    prompts have unit spread, as linear prompts have.
    """

    def __init__(self, geometry: Geometry, config: ZeroInitConfig) -> None:
        super().__init__(geometry, config)
        self.codes = nn.Parameter(torch.randn(self.n_layers, config.n_prompt, config.code_dim))
        self.hidden = nn.Linear(config.code_dim, config.mlp_hidden)
        self.act = ACTIVATIONS[config.activation]()
        self.out = nn.Linear(config.mlp_hidden, geometry.hidden_size)
        with torch.no_grad():
            nn.init.zeros_(self.out.bias)
            spread = torch.stack([self.layer_prompts(i) for i in range(self.n_layers)]).std()
            self.out.weight.div_(spread.clamp_min(1e-12))

    def layer_prompts(self, index: int) -> torch.Tensor:
        return self.out(self.act(self.hidden(self.codes[index])))


class HypermodelPrompts(ZeroInitAdapter):
    """``vec(P_l) = W2 act(W1 e_l + b1) + b2``: one code per layer, one network makes all its prompts.

    The paper's code's "hypermodel" variant (its non-linear script: ReLU, 64-wide
    codes and hidden layer). W2 (``mlp_hidden x n_prompt * hidden``) starts at
    the reference's hyperfan-in scale times 1e-3, b2 at zero: prompts start near
    zero and the zero gate opens onto them.
    """

    def __init__(self, geometry: Geometry, config: ZeroInitConfig) -> None:
        super().__init__(geometry, config)
        self.n_prompt, self.width = config.n_prompt, geometry.hidden_size
        self.codes = nn.Parameter(torch.randn(self.n_layers, config.code_dim))  # nn.Embedding's N(0, 1)
        self.hidden = nn.Linear(config.code_dim, config.mlp_hidden)
        self.act = ACTIVATIONS[config.activation]()
        self.out = nn.Linear(config.mlp_hidden, config.n_prompt * geometry.hidden_size)
        bound = 1e-3 * math.sqrt(3 / (config.mlp_hidden * geometry.hidden_size))
        nn.init.uniform_(self.out.weight, -bound, bound)
        nn.init.zeros_(self.out.bias)

    def layer_prompts(self, index: int) -> torch.Tensor:
        return self.out(self.act(self.hidden(self.codes[index]))).view(self.n_prompt, self.width)


PROMPTS = {"hypermodel": HypermodelPrompts, "deepshare": DeepSharePrompts}


@register_method(
    ZeroInitConfig, families=FAMILIES, identity_at_init=True, generates_with_cache=True, vision_only=False,
    example={"n_prompt": 3, "prompt_type": "nonlinear", "code_dim": 8, "mlp_hidden": 16},
)
def inject_zero_init(model, name: str, config: ZeroInitConfig) -> None:
    prompts = LinearPrompts if config.prompt_type == "linear" else PROMPTS[config.prompt_network]
    add_attention_adapter(model, name, lambda geometry: prompts(geometry, config))
