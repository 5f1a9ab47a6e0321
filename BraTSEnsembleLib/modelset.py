"""A model set: the members of an ensemble, their weights, and the postprocessing that follows the fusion."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ModelError
from .members.base import Member
from .members.nnunet import NnUNetMember
from .postprocess import Step, parse_steps


@dataclass
class ModelSet:
    """Members with one positive weight each (the fused probabilities are the weighted mean) and postprocessing."""

    members: list[Member]
    weights: list[float]
    postprocess: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.members:
            raise ModelError("a model set needs at least one model (--model PATH)")
        if len(self.weights) != len(self.members):
            raise ModelError(f"{len(self.weights)} weight(s) given for {len(self.members)} model(s); give one "
                             "--weight per --model, or none for equal weights")
        if any(not w > 0 for w in self.weights):
            raise ModelError(f"weights must be positive numbers, got {self.weights}")

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role some member needs, in first-seen order."""
        seen: dict[str, None] = {}
        for member in self.members:
            seen.update(dict.fromkeys(member.roles))
        return tuple(seen)

    def describe(self) -> dict[str, Any]:
        """Provenance of the set, as recorded with every output."""
        return {
            "members": [{**m.describe(), "weight": w} for m, w in zip(self.members, self.weights)],
            "postprocess": [str(s) for s in self.postprocess],
        }


def nnunet_model_set(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
                     folds: Sequence[str] | None = None, checkpoint: str = "final", use_mirroring: bool = True,
                     tile_step_size: float = 0.5, postprocess: str = "none",
                     trusted_checkpoints: Sequence[str | Path] = ()) -> ModelSet:
    """A model set of nnU-Net v2 results folders (the command line's ``--model`` options)."""
    trusted = {Path(p).resolve() for p in trusted_checkpoints}
    members: list[Member] = []
    for path in paths:
        model_dir = Path(path).expanduser().resolve()
        trust = any(model_dir in t.parents for t in trusted)
        members.append(NnUNetMember(model_dir, folds=folds, checkpoint=checkpoint, use_mirroring=use_mirroring,
                                    tile_step_size=tile_step_size, trust_checkpoint=trust))
    try:
        steps = parse_steps(postprocess)
    except ValueError as exc:
        raise ModelError(str(exc)) from exc
    return ModelSet(members, list(weights) if weights else [1.0] * len(members), steps)
