"""Building a family's frozen settings dataclass from a validated config block."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from ._errors import InputError

S = TypeVar("S")


def settings_from(cls: type[S], block: Mapping[str, Any], where: str) -> S:
    """``cls(**block)`` less ``latent_dims`` (each latent dimension is its own fit); a key
    that is not a field of ``cls`` raises :class:`InputError` naming ``where.<key>``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    extra = sorted(set(block) - names - {"latent_dims"})
    if extra:
        raise InputError(f"{where}.{extra[0]}", f"not a setting (known: {sorted(names)})")
    return cls(**{k: v for k, v in block.items() if k in names})


def config_settings(settings: Any, python_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings as a plain dict, without the Python-only fields (those the config lacks)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in python_only}
