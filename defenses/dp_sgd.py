"""Client-side DP-SGD with Opacus, its epsilon composed across rounds.

Per step (Abadi et al. 2016; Opacus ``DPOptimizer``): per-example gradients g_i are
clipped to norm C, summed, Gaussian noise N(0, sigma^2 C^2 I) is added and the sum is
divided by the expected batch size. The accountant (``rdp``, ``prv`` or ``pld``) composes
the releases of every round this client trained, at the rate of the sampler actually used
(:func:`defenses.accounting.sampler_release`: Poisson at q = 1/len(loader), or one q = 1
release per pass over the data for fixed-size shuffled batches); the history lives in
``ctx.state["dp_sgd"]`` (JSON) so the epsilon after round r covers rounds 1..r (Flower's
Opacus example creates a new PrivacyEngine per round and never composes; we do). The client
reports each round's (sigma, q, releases), so the server can rebuild and checkpoint the
ledger and hand it back after ``--resume``. Client sampling gives no amplification against
the server, see ``defenses.accounting``.

Noise and Poisson sampling draw from the client's private randomness
(:mod:`defenses.randomness`), so the server cannot replay them from the public seed;
``noise_seed`` makes both reproducible from the config instead, and the round reports
``dp_noise_secret = 0`` (its epsilon does not hold against the server). ``max_epsilon``
makes a client refuse a round that would take its epsilon past the budget: it trains
nothing, sends nothing the server may aggregate, and reports ``privacy_budget_exhausted``.

Project choices:
* ``wrap_model=False``: Opacus attaches hooks to the original module instead of wrapping it
  in a ``GradSampleModule``, so ``ctx.model`` keeps its parameter names (no ``_module.``
  prefix) and the training loop's update is computed from the trained module itself.
  The hooks are removed in ``after_training``.
* Hugging Face models broadcast ``position_ids`` of shape [1, L] into the position
  embedding, which gives that ``nn.Embedding`` a per-sample gradient of batch 1 (Opacus
  issue #841). A forward pre-hook passes ``position_ids = arange(L)`` expanded to [B, L],
  which is what the model would use anyway for unpadded, cache-free training.
* ``target_epsilon`` is calibrated once for the whole run assuming the client trains in
  every one of ``rounds`` rounds with this round's number of local steps (conservative:
  a client sampled less often spends less).
* ``clipping = "per_layer"`` clips each of the L parameter tensors to C / sqrt(L) (Opacus takes one threshold
  per tensor), so a whole per-example gradient still has norm <= C and the noise is calibrated as for flat
  clipping; ``dp_clip_fraction`` is reported for flat clipping only (NaN for per_layer).
* The model must have no BatchNorm (Opacus cannot clip per example through it); the
  project's transformers use LayerNorm.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings
from typing import Any

import torch

from defenses.accounting import ACCOUNTANTS, PrivacyLedger, check_delta, check_epsilon, noise_multiplier_for, \
    sampler_release
from defenses.base import DEFENSES, ClientContext, Defense
from defenses.randomness import private_generator

STATE_KEY = "dp_sgd"
GRAD_SAMPLE_MODES = ("hooks", "functorch")  # the modes Opacus supports with wrap_model=False


def _position_ids_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Give HF models per-example position ids [B, L] (see module docstring, Opacus #841)."""
    ids = kwargs.get("input_ids")
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    if ids is not None and kwargs.get("position_ids") is None:
        B, L = ids.shape[:2]
        kwargs["position_ids"] = torch.arange(L, device=ids.device).expand(B, L)
    return args, kwargs


def _install_padding_aware_embedding_sampler() -> None:
    """Opacus's nn.Embedding grad sampler ignores ``padding_idx``: the padding row gets a
    per-sample gradient although autograd gives it none, which also inflates the clipped
    norm. Wrap it so that row is zero (idempotent; affects Opacus process-wide)."""
    from opacus.grad_sample.embedding import compute_embedding_grad_sample
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.utils import register_grad_sampler

    if getattr(GradSampleHooks.GRAD_SAMPLERS.get(torch.nn.Embedding), "_fedprobe", False):
        return

    def sampler(layer: torch.nn.Embedding, activations: Any, backprops: torch.Tensor) -> dict:
        ret = compute_embedding_grad_sample(layer, activations, backprops)
        if layer.padding_idx is not None and layer.weight in ret:
            ret[layer.weight][:, layer.padding_idx] = 0  # [B, V, D]
        return ret

    sampler._fedprobe = True  # type: ignore[attr-defined]
    register_grad_sampler(torch.nn.Embedding)(sampler)


def _install_vit_embeddings_sampler() -> None:
    """A grad sampler for Hugging Face ``ViTEmbeddings``' own parameters (``cls_token``, ``position_embeddings``,
    ``mask_token``). Opacus has none, so it falls back to functorch for the whole module, re-running the patch
    convolution under ``vmap`` each step (~30 % of the grad-sample time, issue 19). Their per-sample gradients are
    read off the module's output gradient instead: ``out = dropout(cat(cls, patches) + pos)``, so with dropout off
    d pos_i = d out_i and d cls_i = d out_i[0]; the convolution keeps Opacus's own sampler. Active embedding
    dropout is refused by :func:`_check_vit_embeddings` (Opacus's fallback failed there too: a random op under
    ``vmap``), and so is an interpolated position encoding (idempotent; Opacus process-wide)."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks
    from opacus.grad_sample.utils import register_grad_sampler
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    if ViTEmbeddings in GradSampleHooks.GRAD_SAMPLERS:
        return

    def sampler(layer: Any, activations: Any, backprops: torch.Tensor) -> dict:
        if backprops.shape[1:] != layer.position_embeddings.shape[1:]:
            raise ValueError(f"dp_sgd: ViT embeddings of {backprops.shape[1]} tokens for "
                             f"{layer.position_embeddings.shape[1]} position embeddings (an interpolated position "
                             "encoding) have no per-example gradient here; train at the model's image size")
        ret = {}
        if layer.position_embeddings.requires_grad:
            ret[layer.position_embeddings] = backprops.unsqueeze(1).contiguous()  # [B, 1, N+1, D]
        if layer.cls_token.requires_grad:
            ret[layer.cls_token] = backprops[:, :1].unsqueeze(1).contiguous()  # [B, 1, 1, D]
        if layer.mask_token is not None and layer.mask_token.requires_grad:
            # only a bool_masked_pos (a keyword the hooks never see) uses it; functorch gave zeros here too
            ret[layer.mask_token] = torch.zeros(len(backprops), *layer.mask_token.shape, dtype=backprops.dtype,
                                                device=backprops.device)
        return ret

    register_grad_sampler(ViTEmbeddings)(sampler)


def _check_vit_embeddings(model: torch.nn.Module) -> None:
    from transformers.models.vit.modeling_vit import ViTEmbeddings

    for name, m in model.named_modules():
        if isinstance(m, ViTEmbeddings) and m.dropout.p > 0:
            raise ValueError(f"dp_sgd: dropout p={m.dropout.p:g} on the ViT embeddings ({name}) has no exact "
                             "per-example gradient (its mask is not recorded); set "
                             "model.params.hidden_dropout_prob = 0.0")


def _prime_empty_batches(loader: Any) -> None:
    """Opacus learns the shape of an empty Poisson batch from the first non-empty one; when the very first batch is
    empty it returns a list of tensors typed after our dict examples and fails. Give it the structure up front (only
    shapes and dtypes are used: the empty batch has zero rows)."""
    collate = getattr(loader, "collate_fn", None)
    if getattr(collate, "first_batch", "absent") is None and len(loader.dataset) > 0:
        inner = collate.wrapped_collator_fn
        example = [loader.dataset[0]]
        collate.first_batch = inner(example) if inner is not None else example


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each example's whole gradient, [B], from per-parameter per-sample gradients [B, ...] (the same
    computation, in the same order, as Opacus 1.6's flat ``DPOptimizer.clip_and_accumulate``)."""
    per_param = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]  # each [B]
    device = per_param[0].device
    return torch.stack([n.to(device) for n in per_param], dim=1).norm(2, dim=1)  # [B]


def _count_clipped(optimizer: Any, count: Any) -> bool:
    """Make a flat-clipping ``DPOptimizer`` hand its per-sample norms to ``count`` as it clips.

    Opacus 1.6's ``DPOptimizer.clip_and_accumulate`` computes the norms in a local variable and keeps nothing, so
    the clip fraction needed a second pass over every per-sample gradient each step (issue 19 point 2). This
    replaces that one method on this instance with the same computation (norms, clip factor C / (norm + 1e-6)
    clamped at 1, einsum into ``p.summed_grad``; ``tests/defenses/test_dp_sgd.py`` checks it against Opacus's) that
    also counts. Returns False, changing nothing, for any other optimizer class (per-layer, distributed, ...).
    """
    import types

    from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

    if type(optimizer) is not DPOptimizer:
        return False
    original = optimizer.clip_and_accumulate

    def clip_and_accumulate(self: Any) -> None:
        if len(self.grad_samples[0]) == 0:  # empty Poisson batch: Opacus's own path
            return original()
        norms = per_sample_norms(self.grad_samples)  # [B]
        count(norms)
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # [B]
        for p in self.params:
            _check_processed_flag(p.grad_sample)
            grad_sample = self._get_flat_grad_sample(p).to(p.dtype)  # [B, *p.shape]
            grad = torch.einsum("i,i...", factor.to(grad_sample.device).to(p.dtype), grad_sample)  # [*p.shape]
            if p.summed_grad is not None:
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    optimizer.clip_and_accumulate = types.MethodType(clip_and_accumulate, optimizer)
    return True


def seeded_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator from (seed, round, client): reproducible noise for tests only."""
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") >> 1)


@DEFENSES.register("dp_sgd")
class DPSGD(Defense):
    """Client-side DP-SGD (Opacus): per-example clipping and Gaussian noise; epsilon composed over rounds."""

    def __init__(
        self,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        rounds: int | None = None,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: str = "rdp",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str = "hooks",
        secure_mode: bool = False,
        noise_seed: int | None = None,
        max_epsilon: float | None = None,
    ) -> None:
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("dp_sgd needs exactly one of noise_multiplier or target_epsilon (with rounds)")
        if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"dp_sgd noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if target_epsilon is not None:
            check_epsilon(target_epsilon)
            if not (isinstance(rounds, int) and rounds >= 1):
                raise ValueError("dp_sgd target_epsilon needs rounds (the run's federation.rounds), e.g. rounds = 3")
        check_delta(delta)
        if not max_grad_norm > 0:
            raise ValueError(f"dp_sgd max_grad_norm must be > 0, got {max_grad_norm!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"dp_sgd accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        if max_epsilon is not None:
            check_epsilon(max_epsilon)
        if not isinstance(poisson_sampling, bool):
            raise ValueError(f"dp_sgd poisson_sampling must be true or false, got {poisson_sampling!r}")
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"dp_sgd clipping must be 'flat' or 'per_layer', got {clipping!r}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"dp_sgd grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)} "
                             f"(ghost clipping changes the loss API), got {grad_sample_mode!r}")
        if secure_mode and noise_seed is not None:
            raise ValueError("dp_sgd: noise_seed makes noise predictable; it cannot be combined with secure_mode")
        if secure_mode:
            import importlib.util

            if importlib.util.find_spec("torchcsprng") is None:
                raise ValueError("dp_sgd secure_mode needs torchcsprng, which has no build for torch 2.x; leave it off: "
                                 "the noise already comes from the clients' secret (defenses/randomness.py)")
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.rounds = rounds
        self.delta = delta
        self.max_grad_norm = float(max_grad_norm)
        self.accountant = accountant
        self.poisson_sampling = poisson_sampling
        self.clipping = clipping
        self.grad_sample_mode = grad_sample_mode
        self.secure_mode = secure_mode
        self.noise_seed = noise_seed
        self.max_epsilon = max_epsilon
        self._reset()

    def _reset(self) -> None:
        self._hooks: Any = None
        self._pos_handle: Any = None
        self._steps = 0
        self._clipped = 0.0
        self._seen = 0
        self._counting = False  # whether _count_clipped counts this round's clipped examples
        self._sigma = 0.0
        self._q = 0.0
        self._releases = 0
        self._refused = False
        self._epsilon_after: float | None = None  # this round's epsilon, when setup already computed it (max_epsilon)
        self._expected_batch = 1

    # -- client side --------------------------------------------------------------------
    def sigma_for(self, sample_rate: float, steps_per_round: int) -> float:
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        assert self.target_epsilon is not None and self.rounds is not None
        return noise_multiplier_for(self.target_epsilon, self.delta, sample_rate,
                                    self.rounds * steps_per_round, self.accountant)

    def check_model(self, model: torch.nn.Module) -> None:
        _check_vit_embeddings(model)

    def setup(self, ctx: ClientContext) -> None:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        model = ctx.model
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"dp_sgd: model is not compatible with Opacus: {errors[0]}; "
                             "use a model without BatchNorm (the project's transformers are fine)")

        batches = len(ctx.loader)
        steps_per_round = ctx.local_steps if ctx.local_steps > 0 else ctx.epochs * batches
        self._q, self._releases = sampler_release(self.poisson_sampling, steps_per_round, batches)
        stored = ctx.state.get(STATE_KEY, {})
        cached = stored.get("sigma")
        self._sigma = float(cached) if cached is not None and self.target_epsilon is not None else \
            self.sigma_for(self._q, self._releases)
        if self.max_epsilon is not None:
            ledger = PrivacyLedger.from_dict(stored.get("ledger"), self.accountant)
            spent = ledger.epsilon(self.delta)
            ledger.record(self._sigma, self._q, self._releases)
            after = self._epsilon_after = ledger.epsilon(self.delta)
            if after > self.max_epsilon:
                self._refused = True
                ctx.refuse(f"dp_sgd budget: epsilon would reach {after:.3g} > max_epsilon={self.max_epsilon:g} "
                           f"(spent {spent:.3g})")
                ctx.metrics.update({"privacy_budget_exhausted": 1.0, "epsilon": spent})
                return

        model.train()
        _install_padding_aware_embedding_sampler()
        self.check_model(model)  # also where no preflight ran (a user's own Flower app)
        _install_vit_embeddings_sampler()
        if "position_ids" in inspect.signature(model.forward).parameters:
            self._pos_handle = model.register_forward_pre_hook(_position_ids_hook, with_kwargs=True)

        if self.noise_seed is not None:  # reproducible from the config: the server can replay it
            generator = seeded_generator(self.noise_seed, ctx.server_round, ctx.partition_id, device=ctx.device)
            sampling = seeded_generator(self.noise_seed, ctx.server_round, ctx.partition_id, 1)
        else:
            generator = private_generator("dp_sgd-noise", ctx.server_round, ctx.partition_id, device=ctx.device)
            sampling = private_generator("dp_sgd-sampling", ctx.server_round, ctx.partition_id)
        if not self.secure_mode:
            sampler = getattr(ctx.loader, "batch_sampler", None)
            sampler = getattr(sampler, "sampler", sampler)
            if hasattr(sampler, "generator"):  # a shuffled loader (its own generator or none): order from ours
                # in place, as Opacus's switch_generator does before it rebuilds the loader (which fails for
                # drop_last=True: "batch_sampler option is mutually exclusive with ... drop_last")
                sampler.generator = sampling
            ctx.loader.generator = sampling  # DPDataLoader.from_data_loader draws its Poisson masks from it
        with warnings.catch_warnings():  # "Secure RNG turned off": secure_mode is a documented option
            warnings.simplefilter("ignore", UserWarning)
            # the engine's own accountant is never stepped (our ledger accounts); Opacus has no "pld"
            engine = PrivacyEngine(accountant="rdp" if self.accountant == "pld" else self.accountant,
                                   secure_mode=self.secure_mode)
        hooks, optimizer, loader = engine.make_private(
            module=model, optimizer=ctx.optimizer, data_loader=ctx.loader,
            noise_multiplier=self._sigma, max_grad_norm=self._clip_norms(ctx.optimizer),
            poisson_sampling=self.poisson_sampling, clipping=self.clipping,
            grad_sample_mode=self.grad_sample_mode, noise_generator=generator, wrap_model=False,
        )
        self._hooks = hooks
        _prime_empty_batches(loader)
        self._expected_batch = optimizer.expected_batch_size
        optimizer.attach_step_hook(self._on_step)  # replaces the engine's accountant hook: our ledger accounts
        self._counting = _count_clipped(optimizer, self._count)  # flat DPOptimizer: clip fraction at no extra cost
        ctx.optimizer, ctx.loader = optimizer, loader

    def _clip_norms(self, optimizer: Any) -> float | list[float]:
        """Opacus's ``max_grad_norm``: C (flat), or C / sqrt(L) for each of the L parameter tensors (per_layer), so
        the whole clipped gradient still has norm <= C and the noise N(0, sigma^2 C^2) calibrates as for flat."""
        if self.clipping == "flat":
            return self.max_grad_norm
        from opacus.optimizers.utils import params

        n = len(params(optimizer))
        return [self.max_grad_norm / math.sqrt(n)] * n

    def _on_step(self, optimizer: Any) -> None:
        """Called by DPOptimizer after clip + noise: count the step."""
        self._steps += 1

    def _count(self, per_sample_norms: torch.Tensor) -> None:
        """Called by the clipping itself (:func:`_count_clipped`) with the norms Opacus clips with, [B]."""
        self._clipped += float((per_sample_norms > self.max_grad_norm).sum())
        self._seen += len(per_sample_norms)

    def after_training(self, ctx: ClientContext) -> None:
        if self._refused:
            self._reset()
            return
        if self._hooks is not None:
            self._hooks.cleanup()  # removes hooks and p.grad_sample from the original module
        if self._pos_handle is not None:
            self._pos_handle.remove()
        stored = ctx.state.get(STATE_KEY, {})
        ledger = PrivacyLedger.from_dict(stored.get("ledger"), self.accountant)
        # what the sampler costs (sampler_release), not the steps taken: an empty Poisson batch is still a release
        ledger.record(self._sigma, self._q, self._releases)
        ctx.state[STATE_KEY] = {"ledger": ledger.to_dict(), "sigma": self._sigma}
        ctx.metrics.update({
            "epsilon": ledger.epsilon(self.delta) if self._epsilon_after is None else self._epsilon_after,
            "dp_delta": float(self.delta),
            "dp_noise_multiplier": self._sigma,
            # std of the noise in each coordinate of one averaged gradient: sigma * C / E[B]
            "dp_noise_std": self._sigma * self.max_grad_norm / max(self._expected_batch, 1),
            "dp_clip_fraction": self._clipped / self._seen if self._seen and self._counting else float("nan"),
            "dp_steps": float(self._steps),
            "dp_total_steps": float(ledger.steps),
            "dp_sample_rate": self._q,  # the accounted rate: 1/len(loader) (Poisson) or 1 (shuffled batches)
            "dp_releases": float(self._releases),
            "dp_poisson": float(self.poisson_sampling),
            "dp_noise_secret": float(self.noise_seed is None),
        })
        self._reset()
