"""What a serving node trusts, and how far: the checkpoint keys, and the bounds on what it builds.

A key is trusted with weights, not code or unbounded work (the README's
Security section): :func:`public_keys_from_settings` reads the keys a
manifest must be signed by, and :func:`load_rules` the
:class:`~stream_learner.serving.model.BuildPolicy` (the architectures
allowed, a parameter bound, the frozen base and the device) and the
:class:`~stream_learner.checkpoint.reader.LoadLimits` every checkpoint is
read within.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..checkpoint.assemble import LoadLimits
from ..checkpoint.signing import load_public_key
from ..config import Settings
from ..errors import ConfigError
from ..learn.frozen import check_device, load_base
from .model import BuildPolicy

__all__ = ["load_rules", "public_keys_from_settings"]


def public_keys_from_settings(settings: Settings) -> list[Ed25519PublicKey]:
    """The trusted checkpoint keys named by ``serving_public_keys`` (PEM files).

    Raises :class:`~stream_learner.errors.ConfigError` if none is set, and
    :class:`~stream_learner.checkpoint.errors.SignatureError` for a file
    that is unreadable or not an Ed25519 public key.

    >>> public_keys_from_settings(Settings(serving_public_keys=[]))
    Traceback (most recent call last):
    ...
    stream_learner.errors.ConfigError: serving_public_keys is empty: give the PEM file of the trainer's public key
    """
    if not settings.serving_public_keys:
        raise ConfigError("serving_public_keys is empty: give the PEM file of the trainer's public key")
    return [load_public_key(path) for path in settings.serving_public_keys]


def load_rules(settings: Settings) -> tuple[BuildPolicy, LoadLimits]:
    """The build policy and the read limits of ``settings`` (``serving_*``).

    The device and the frozen base are checked and loaded here, at start: a
    device this machine lacks or a base file that cannot be read is a
    :class:`~stream_learner.errors.ConfigError` now, never a failure mid-stream.
    """
    device = check_device(settings.serving_device, what="serving_device")
    bases = (
        [load_base(settings.serving_base_weights, what="serving_base_weights").to(device)]
        if settings.serving_base_weights
        else []
    )
    policy = BuildPolicy.of(
        settings.serving_allowed_architectures, settings.serving_max_parameters, bases=bases, device=str(device)
    )
    return policy, LoadLimits(max_bytes=settings.serving_max_model_bytes, max_tensors=settings.serving_max_tensors)
