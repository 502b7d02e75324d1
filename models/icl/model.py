"""A small transformer that learns in context on numerical prompts (soft prompts).

Layout: one token per in-context example and one for the query,

    t_i = [x_i; y_i; 1]  (i = 1..m),   t_q = [x_q; 0; 0],

read in by a bias-free linear map e(t) = W_in t, mixed by a GPT-2 block stack
(``transformers.GPT2Model`` fed ``inputs_embeds``, causal, query last so it attends
to every example), and read out by a linear map at the query token: ŷ_q is a
regression value or a classification logit. There are no position embeddings
(GPT-2's ``wpe`` is zeroed and frozen): the examples are exchangeable, so the model
is permutation invariant in them up to the causal order of the example tokens.

Reweighting (RICL): example i's embedding is multiplied by w_i, e'_i = w_i e_i; the
query's weight is 1. As W_in has no bias, this equals feeding w_i t_i.

Prefix: k free vectors P ∈ R^{k×D} placed before the prompt (input-level prefix /
prompt tuning, Lester et al. 2021). Written by hand because peft's prefix tuning needs
a ``PreTrainedModel`` with generation, which this read-in/read-out wrapper is not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import GPT2Config, GPT2Model

from models.icl.tasks import Prompt


@dataclass(frozen=True)
class ICLModelConfig:
    dim: int = 5  # d
    n_examples: int = 20  # m: longest prompt
    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 4
    max_prefix: int = 32  # longest prefix the block stack accepts

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ICLTransformer(nn.Module):
    """ŷ_q = read_out(GPT2([w_1 e_1, …, w_m e_m, e_q])[q])."""

    def __init__(self, cfg: ICLModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gcfg = GPT2Config(
            vocab_size=1, n_positions=cfg.n_examples + 1 + cfg.max_prefix, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, use_cache=False,
        )
        gcfg._attn_implementation = "sdpa"
        self.read_in = nn.Linear(cfg.dim + 2, cfg.n_embd, bias=False)
        self.gpt2 = GPT2Model(gcfg)
        nn.init.zeros_(self.gpt2.wpe.weight)
        self.gpt2.wpe.weight.requires_grad_(False)
        self.read_out = nn.Linear(cfg.n_embd, 1)

    def forward(self, xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor, w: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """xs [B, m, d], ys [B, m], xq [B, d], w [m] or [B, m], prefix [k, D] -> ŷ [B]."""
        B, m, _ = xs.shape
        if m > self.cfg.n_examples:
            raise ValueError(f"prompt of {m} examples exceeds the model's n_examples={self.cfg.n_examples}")
        ex = torch.cat([xs, ys.unsqueeze(-1), xs.new_ones(B, m, 1)], -1)  # [B, m, d+2]
        q = torch.cat([xq, xq.new_zeros(B, 2)], -1).unsqueeze(1)  # [B, 1, d+2]
        e = self.read_in(ex)  # [B, m, D]
        if w is not None:
            e = e * w.to(e.dtype).expand(B, m).unsqueeze(-1)
        h = torch.cat([e, self.read_in(q)], 1)  # [B, m+1, D]
        if prefix is not None:
            if prefix.shape[0] > self.cfg.max_prefix:
                raise ValueError(f"prefix length {prefix.shape[0]} exceeds max_prefix={self.cfg.max_prefix}")
            h = torch.cat([prefix.to(h.dtype).expand(B, -1, -1), h], 1)
        out = self.gpt2(inputs_embeds=h).last_hidden_state  # [B, k+m+1, D]
        return self.read_out(out[:, -1]).squeeze(-1)

    def predict(self, prompt: Prompt, xq: torch.Tensor, w: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """ŷ(w) for each query given one prompt: xq [n, d], w [m] or [n, m] -> [n] (queries never interact)."""
        n, m = xq.shape[0], prompt.m
        dt = self.read_in.weight.dtype
        xs, ys = prompt.xs.to(dt).expand(n, m, -1), prompt.ys.to(dt).expand(n, m)
        return self(xs, ys, xq.to(dt), w=w, prefix=prefix)
