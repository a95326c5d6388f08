"""Model families (families/base.py): each module here registers one; `load_student` turns a checkpoint folder into
a validated StudentSpec through its family's rules."""

from __future__ import annotations

from pathlib import Path

from edgecompile.errors import input_error
from edgecompile.families.base import Family, family_for, family_of, registered, supported
from edgecompile.inputs.student import StudentSpec, check_weights, read_checkpoint

__all__ = ["Family", "family_for", "family_of", "load_student", "registered", "supported"]


def load_student(path: Path, *, role: str = "student") -> StudentSpec:
    """Validate a checkpoint folder against its family's rules; `role` names it in errors. Nothing heavy is loaded."""
    checkpoint = read_checkpoint(Path(path), role=role)
    family = family_for(checkpoint.config_path, checkpoint.config)
    if checkpoint.modules is not None and family.task != "feature-extraction":
        raise input_error(checkpoint.path / "modules.json", "first module", "an encoder (sentence-transformers wraps encoders)",
                          f"a {family.description}")
    check = family.check_config(checkpoint.config_path, checkpoint.config, sentence_transformers=checkpoint.modules is not None)
    names = check_weights(checkpoint.transformer_dir)
    return family.student_spec(checkpoint, check, names)
