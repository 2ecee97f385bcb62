"""What a Python task function receives: its data ID, input and output datasets, and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Ref:
    """A dataset as a task sees it: type, data ID and a file path."""

    dataset_type: str
    data_id: dict[str, Any]
    path: Path


@dataclass
class QuantumContext:
    """One quantum's view of the world. ``inputs[type]`` is a list (fan-in gives several);
    ``outputs[type]`` is the single path the task must write."""

    label: str
    data_id: dict[str, Any]
    inputs: dict[str, list[Ref]]
    outputs: dict[str, Ref]
    config: dict[str, Any] = field(default_factory=dict)

    def input(self, dataset_type: str) -> Ref:
        """The one input of a type; a clear error when a fan-in gave several."""
        refs = self.inputs.get(dataset_type, [])
        if len(refs) != 1:
            raise ValueError(f"{self.label}: expected one '{dataset_type}' input, got {len(refs)}")
        return refs[0]
