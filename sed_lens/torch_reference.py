"""The paper's model as bare PyTorch: ``nn.TransformerEncoder`` between an embedding and a linear head.

This is the architecture of Xu (2026) written the plain way (token ``nn.Embedding``, a learned ``[n_ctx,
d_model]`` positional parameter, a pre-norm ``nn.TransformerEncoder``, a final ``LayerNorm`` and one
``nn.Linear`` head per op read at one position). sed_lens uses it twice:

* ``build_model(..., init="torch")`` builds this module under the seed and converts its weights into a
  ``HookedTransformer`` (:func:`hooked_state_dict`), so the HookedTransformer starts exactly where the paper's
  PyTorch model starts — including PyTorch's quirk that ``nn.TransformerEncoder`` deep-copies one layer, so
  every layer starts with the same weights;
* the benchmarks time it as the reference training loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class TorchTransformer(nn.Module):
    """Embedding → ``nn.TransformerEncoder`` (pre-norm, no dropout) → final norm → one linear head per op.

    Args:
        d_vocab: input tokens.  n_ctx: positions.  d_model, n_heads, d_mlp, n_layers: encoder shape.
        head_sizes: output classes of each head (one per op), concatenated in the output.
        act_fn: ``"gelu"`` or ``"relu"``.  layer_norm: ``False`` replaces every LayerNorm by the identity.
        causal: mask attention to earlier positions.  readout_position: the position the heads read.
    """

    def __init__(self, d_vocab: int, n_ctx: int, d_model: int, n_heads: int, d_mlp: int, n_layers: int,
                 head_sizes: Sequence[int], act_fn: str = "gelu", layer_norm: bool = True,
                 causal: bool = False, readout_position: int = 0) -> None:
        super().__init__()
        # Construction order fixes which random numbers each weight receives under a given seed.
        self.tok_emb = nn.Embedding(d_vocab, d_model)  # N(0, 1)
        self.pos_emb = nn.Parameter(torch.randn(n_ctx, d_model) / math.sqrt(d_model))  # N(0, 1/d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_mlp, dropout=0.0, activation=act_fn,
                                           batch_first=True, norm_first=True)
        if not layer_norm:
            # torch annotates norm1/norm2 as LayerNorm; putting Identity there is how this variant drops them
            cast(Any, layer).norm1, cast(Any, layer).norm2 = nn.Identity(), nn.Identity()
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(d_model, n) for n in head_sizes)
        self.causal = causal
        self.readout_position = readout_position
        self.n_heads = n_heads

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch n_out"]:
        h = self.tok_emb(tokens) + self.pos_emb[: tokens.shape[1]]
        mask = None
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        h = self.encoder(h, mask=mask, is_causal=self.causal)
        r = self.ln(h[:, self.readout_position])
        return torch.cat([head(r) for head in self.heads], dim=-1)


def hooked_state_dict(ref: TorchTransformer) -> dict[str, Tensor]:
    """The weights of ``ref`` under TransformerLens' parameter names and shapes.

    ``in_proj_weight`` rows ``[h·d_head, (h+1)·d_head)`` of the Q/K/V blocks become ``W_Q/W_K/W_V[h]``
    (transposed to ``[d_model, d_head]``); ``out_proj`` columns of head h become ``W_O[h]``; ``linear1/linear2``
    become ``W_in/W_out``; ``norm1/norm2`` become ``ln1/ln2``; the heads are concatenated into ``W_U``.
    """
    d_model = ref.pos_emb.shape[1]
    n_heads = ref.n_heads
    d_head = d_model // n_heads
    out: dict[str, Tensor] = {"embed.W_E": ref.tok_emb.weight, "pos_embed.W_pos": ref.pos_emb}
    layers: Sequence[nn.TransformerEncoderLayer] = ref.encoder.layers
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        w_in = attn.in_proj_weight.view(3, n_heads, d_head, d_model)  # [qkv, head, d_head, d_model]
        b_in = attn.in_proj_bias.view(3, n_heads, d_head)
        for j, m in enumerate("QKV"):
            out[f"blocks.{i}.attn.W_{m}"] = w_in[j].transpose(1, 2)
            out[f"blocks.{i}.attn.b_{m}"] = b_in[j]
        w_o = attn.out_proj.weight.view(d_model, n_heads, d_head)  # [d_model, head, d_head]
        out[f"blocks.{i}.attn.W_O"] = w_o.permute(1, 2, 0)
        out[f"blocks.{i}.attn.b_O"] = attn.out_proj.bias
        out[f"blocks.{i}.mlp.W_in"] = layer.linear1.weight.T
        out[f"blocks.{i}.mlp.b_in"] = layer.linear1.bias
        out[f"blocks.{i}.mlp.W_out"] = layer.linear2.weight.T
        out[f"blocks.{i}.mlp.b_out"] = layer.linear2.bias
        for src, dst in (("norm1", "ln1"), ("norm2", "ln2")):
            norm = getattr(layer, src)
            if isinstance(norm, nn.LayerNorm):
                out[f"blocks.{i}.{dst}.w"] = norm.weight
                out[f"blocks.{i}.{dst}.b"] = norm.bias
    if isinstance(ref.ln, nn.LayerNorm):
        out["ln_final.w"] = ref.ln.weight
        out["ln_final.b"] = ref.ln.bias
    heads = cast(Iterable[nn.Linear], ref.heads)  # nn.ModuleList is untyped; __init__ fills it with nn.Linear only
    out["unembed.W_U"] = torch.cat([h.weight for h in heads], dim=0).T
    out["unembed.b_U"] = torch.cat([h.bias for h in heads], dim=0)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}
