"""Numerical in-context tasks: prompts of m (x, y) examples plus queries.

A *problem instance* is one task function f (drawn per prompt), one prompt of m
examples of f, and query points with their labels. Two task kinds:

* ``regression``:     y = βᵀx + ε,  β ~ N(0, I_d / d),  ε ~ N(0, noise_std²)
* ``classification``: y = sign(βᵀx) ∈ {-1, +1}, each label flipped with probability ``label_noise``

The **unbiased** (validation / query) distribution, D_val, is the one every query,
validation and test point is drawn from: x ~ N(0, I_d), y = f(x) (+ noise as above).
Under D_val both classes have probability 1/2 (N(0, I) is symmetric).

Prompt distributions (how the m in-context examples are drawn):

* ``balanced``:   x_i ~ D_val i.i.d., i.e. the prompt is unbiased.
* ``biased``:     covariate shift. A fraction ``bias_frac`` of the m examples (rounded)
  has x_i ~ N(shift · u, I_d), with u a unit direction drawn per prompt; the rest
  x_i ~ D_val. Labels are still y_i = f(x_i): the examples are correct but the
  inputs are not representative of the queries.
* ``imbalanced``: label (class) imbalance. round(major_frac · m) examples have
  y_i > 0 (class +1, the over-represented class) and the rest y_i < 0, each x_i drawn
  from D_val conditioned on its class (a point of the wrong class is reflected,
  x → −x, which maps N(0, I) conditioned on one half-space onto the other). For
  regression the "class" is the sign of βᵀx.

Provenance: the paper uses a synthetic numerical data set with soft prompts under
"different distribution prefixes" [paper, reviews]; it does not define "unbiased"
(a reviewer complaint), so every definition above is this project's choice [derived].

All sampling takes an explicit ``torch.Generator`` so every draw is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TaskKind = Literal["regression", "classification"]
PromptKind = Literal["balanced", "biased", "imbalanced"]
PROMPT_KINDS: tuple[str, ...] = ("balanced", "biased", "imbalanced")
TASK_KINDS: tuple[str, ...] = ("regression", "classification")


@dataclass(frozen=True)
class ICLTask:
    """A family of in-context problems (shapes and noise, no data)."""

    kind: TaskKind = "regression"
    dim: int = 5  # d, input dimension
    n_examples: int = 20  # m, in-context examples per prompt
    noise_std: float = 0.1  # regression label noise
    label_noise: float = 0.0  # classification label-flip probability
    bias_frac: float = 0.75  # biased prompts: fraction of shifted examples
    shift: float = 3.0  # biased prompts: ‖mean‖ of the shifted inputs
    major_frac: float = 0.85  # imbalanced prompts: fraction of class +1 examples

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"ICLTask.kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if self.dim < 1 or self.n_examples < 1:
            raise ValueError(f"ICLTask needs dim >= 1 and n_examples >= 1, got {self.dim}, {self.n_examples}")
        for name in ("bias_frac", "major_frac", "label_noise"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ICLTask.{name} must lie in [0, 1], got {v}")

    @property
    def loss(self) -> Literal["mse", "bce"]:
        """Loss on the model output: squared error (regression) or logistic (classification)."""
        return "mse" if self.kind == "regression" else "bce"


@dataclass
class Prompt:
    """m in-context examples of one task: xs [m, d], ys [m]; ``beta`` [d] is the task."""

    xs: torch.Tensor
    ys: torch.Tensor
    beta: torch.Tensor

    @property
    def m(self) -> int:
        return self.xs.shape[0]


def sample_beta(task: ICLTask, gen: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """β ~ N(0, I_d / d), shape [*batch, d]."""
    return torch.randn(*batch, task.dim, generator=gen) / task.dim**0.5


def label(task: ICLTask, x: torch.Tensor, beta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """y = f(x) for x [..., n, d], beta [..., d] -> y [..., n] (with the task's noise)."""
    z = torch.einsum("...nd,...d->...n", x, beta.to(x.dtype))
    if task.kind == "regression":
        return z + task.noise_std * torch.randn(z.shape, generator=gen, dtype=z.dtype)
    y = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
    if task.label_noise > 0:
        flip = torch.rand(z.shape, generator=gen) < task.label_noise
        y = torch.where(flip, -y, y)
    return y


def sample_unbiased_x(task: ICLTask, n: int, gen: torch.Generator, batch: tuple[int, ...] = ()) -> torch.Tensor:
    """x ~ D_val = N(0, I_d), shape [*batch, n, d]."""
    return torch.randn(*batch, n, task.dim, generator=gen)


def sample_prompt_x(task: ICLTask, beta: torch.Tensor, kind: PromptKind, gen: torch.Generator) -> torch.Tensor:
    """Prompt inputs xs [m, d] for one task ``beta`` [d] under the prompt distribution ``kind``."""
    m, d = task.n_examples, task.dim
    x = sample_unbiased_x(task, m, gen)
    if kind == "balanced":
        return x
    if kind == "biased":
        k = round(task.bias_frac * m)
        u = torch.randn(d, generator=gen)
        u = u / u.norm()
        x[:k] = x[:k] + task.shift * u
    elif kind == "imbalanced":
        k = round(task.major_frac * m)
        want = torch.cat([torch.ones(k), -torch.ones(m - k)])  # class +1 over-represented
        side = torch.where(x @ beta >= 0, 1.0, -1.0)
        x = x * (side * want).unsqueeze(1)  # reflect points of the wrong class
    else:
        raise ValueError(f"prompt kind must be one of {PROMPT_KINDS}, got {kind!r}")
    return x[torch.randperm(m, generator=gen)]


def sample_prompt(task: ICLTask, kind: PromptKind, gen: torch.Generator, beta: torch.Tensor | None = None) -> Prompt:
    """One prompt of m labelled examples of a fresh (or the given) task."""
    beta = sample_beta(task, gen) if beta is None else beta
    xs = sample_prompt_x(task, beta, kind, gen)
    return Prompt(xs=xs, ys=label(task, xs, beta, gen), beta=beta)


def sample_queries(task: ICLTask, beta: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n labelled points of task ``beta`` from the unbiased distribution D_val: xq [n, d], yq [n]."""
    xq = sample_unbiased_x(task, n, gen)
    return xq, label(task, xq, beta, gen)


def sample_training_batch(task: ICLTask, batch: int, gen: torch.Generator,
                          n_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced training prompts with one query each (fresh β per row).

    Returns xs [B, k, d], ys [B, k], xq [B, d], yq [B] with k = ``n_examples`` (default m).
    """
    k = task.n_examples if n_examples is None else n_examples
    beta = sample_beta(task, gen, (batch,))
    x = sample_unbiased_x(task, k + 1, gen, (batch,))
    y = label(task, x, beta, gen)
    return x[:, :k], y[:, :k], x[:, k], y[:, k]
