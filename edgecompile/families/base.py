"""A model family: what edgecompile knows about one architecture, as one registered class.

A family says which `config.json` it reads (`model_types`, `architectures`), which fields it
implements and refuses (`check_config`), and the task its graphs serve. Encoder families (BERT)
trace a torch module; decoder families (families/decoder.py) write the graph from the checkpoint's
tensors. Everything outside families/ looks a family up (`family_for`, `family_of`) instead of
naming one; adding a family is one module in this package that defines a class under `@register`
(`registered` imports every module here).

The anchors: optimum's per-architecture `OnnxConfig` classes and llama.cpp's `ModelBase.register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgecompile.errors import InputError

CAUSAL_LM = "causal-lm"
FEATURE_EXTRACTION = "feature-extraction"

_REGISTRY: dict[str, type["Family"]] = {}  # model_type -> family


@dataclass(frozen=True)
class ConfigCheck:
    """What `check_config` found acceptable: the architecture, and fields ignored as bookkeeping."""

    architecture: str
    ignored: tuple[str, ...] = field(default_factory=tuple)


class Family:
    """Base of every family; subclasses set the class attributes and implement the hooks their task needs."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    architectures: ClassVar[tuple[str, ...]]
    task: ClassVar[str]
    description: ClassVar[str]  # for "supported:" messages, e.g. "LlamaForCausalLM"

    @classmethod
    def check_config(cls, path: Path, config: dict[str, Any], *, sentence_transformers: bool = False) -> ConfigCheck:
        """Refuse (one line naming the field) any config this family would not compile exactly."""
        raise NotImplementedError

    @classmethod
    def notes(cls, spec: Any, masks: Any) -> list[str]:
        """Lines the build prints about a checkpoint of this family (none by default)."""
        return []

    @classmethod
    def manifest_fields(cls, spec: Any) -> dict[str, Any]:
        """What the manifest's student section adds for this family (nothing by default)."""
        return {}


def register(family: type[Family]) -> type[Family]:
    """Class decorator: make `family` the one for its model types."""
    for model_type in family.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not family:
            raise RuntimeError(f"model_type {model_type!r} registered twice ({_REGISTRY[model_type].name}, {family.name})")
        _REGISTRY[model_type] = family
    return family


def registered() -> dict[str, type[Family]]:
    """model_type -> family. Every module of this package is imported the first time (lazily: the families import
    torch), so each family registers itself and adding one is adding its file."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")
    return dict(_REGISTRY)


def supported() -> str:
    """One phrase naming what edgecompile compiles, for error messages."""
    families = {f.name: f for f in registered().values()}
    return ", ".join(f.description for _, f in sorted(families.items()))


def family_for(path: Path, config: Any) -> type[Family]:
    """The family of a parsed config.json (`path` names it in errors)."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    family = registered().get(model_type) if isinstance(model_type, str) else None
    if family is None:
        architectures = config.get("architectures") if isinstance(config, dict) else None
        name = architectures[0] if isinstance(architectures, list) and architectures else "unknown architecture"
        raise InputError(f"{path}: model family '{model_type}' ({name}) is not supported; supported: {supported()}")
    return family


def family_of(spec: Any) -> type[Family]:
    """The family of a loaded StudentSpec."""
    return family_for(spec.transformer_dir / "config.json", spec.config)
