"""Randomness the server cannot replay: the source of every DP noise draw and DP sample.

fedprobe seeds everything else from public values (experiment seed, round, partition), so
that the same config and seed give the same numbers. DP noise must not be seeded that way:
the server fedprobe models knows the config, and replaying a client's DP-SGD step from the
public seed reproduces its noise and lets the server subtract it (issue 14 measured 1.1e-6
error on a noise of norm 26). Every DP mechanism therefore draws from
:func:`private_generator`, keyed by the *client secret*:

* ``FEDPROBE_CLIENT_SECRET`` in the clients' environment, when set. ``fedprobe run`` sets a
  fresh random one per run before Ray starts (and keeps it in the run's output folder so
  ``--resume`` gets the same one); set it yourself for bit-for-bit repeatable DP runs. It is
  never logged, never in the config, never in a Flower message, and no server-side code of
  fedprobe reads it (the canary audit's out-of-band scorer is the one exception: it plays the
  auditor who planted the canaries, never the attacker).
* otherwise 32 bytes from :mod:`secrets`, fresh on every call (nothing to replay, nothing to
  repeat).

A user who wants the noise reproducible from the config (``noise_seed`` of ``dp_sgd``,
``seed`` of ``update_noise``) gets it, and the run's ``dp_noise_secret`` metric is 0: its
epsilon does not hold against the server.

Why not Opacus's ``secure_mode``: it needs ``torchcsprng``, whose last release (0.2.1,
2021) does not build against torch 2.x. A torch generator (Mersenne Twister) seeded with
63 bits of a keyed BLAKE2b hash is not a CSPRNG, but its seed cannot be guessed and its
outputs reach the server only as noisy sums; ``secure_mode = true`` stays available where
torchcsprng is installed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator

import numpy as np
import torch

SECRET_ENV = "FEDPROBE_CLIENT_SECRET"


def client_secret() -> bytes:
    """The clients' secret key (see module doc); fresh random bytes when none is set."""
    value = os.environ.get(SECRET_ENV, "")
    return value.encode() if value else secrets.token_bytes(32)


def has_stable_secret() -> bool:
    """True when the secret is fixed for the run (needed by anything that must agree across rounds)."""
    return bool(os.environ.get(SECRET_ENV, ""))


def new_secret() -> str:
    return secrets.token_hex(32)


def _digest(purpose: str, parts: tuple[int | str, ...], size: int) -> bytes:
    key = hashlib.blake2b(client_secret(), digest_size=32).digest()
    return hashlib.blake2b(repr((purpose, *parts)).encode(), key=key, digest_size=size).digest()


def private_seed(purpose: str, *parts: int | str) -> int:
    """A 63-bit seed only the holder of the client secret can compute."""
    return int.from_bytes(_digest(purpose, parts, 8), "little") >> 1


def private_generator(purpose: str, *parts: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for ``purpose`` (e.g. ``"dp_sgd-noise"``, round, partition) keyed by the client secret."""
    return torch.Generator(device=device).manual_seed(private_seed(purpose, *parts))


@contextlib.contextmanager
def private_numpy_global(purpose: str, *parts: int | str) -> Iterator[None]:
    """Run a block that draws from numpy's *global* RNG (Flower's DP wrappers do) on a private stream.

    The global state is restored afterwards, so everything seeded outside stays as it was.
    """
    saved = np.random.get_state()
    np.random.seed(np.frombuffer(_digest(purpose, parts, 32), dtype=np.uint32))  # 256 bits of state
    try:
        yield
    finally:
        np.random.set_state(saved)
