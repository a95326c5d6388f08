"""Targets are data: one TOML file per target in targets/ (or any file a user points at).

`load_target("cpu")` finds `cpu.toml` among the shipped targets and the folders in
$EDGECOMPILE_TARGETS_PATH; `load_target("path/to/my.toml")` reads that file. Every key is
checked against SCHEMA: an unknown key or a wrong type is rejected naming the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecompile.errors import InputError, input_error, one_line

# section -> key -> (python type(s), default). A default of REQUIRED must be given.
REQUIRED = object()
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "": {"name": (str, REQUIRED), "description": (str, "")},
    "provider": {"name": (str, REQUIRED), "options": (dict, {})},
    "shapes": {"dynamic": (bool, True), "batch": (int, 1), "sequence": (int, 128)},
    "precision": {"mode": (str, "fp32"), "lowbit_linear": (str, "MatMulIntegerToFloat")},
    "output": {"format": (str, "onnx"), "shared_weights": (bool, True)},
    "parity": {
        "max_relative_error": ((float, int), REQUIRED),
        "min_cosine": ((float, int), REQUIRED),
        "min_argmax_agreement": ((float, int), 1.0),
        "min_router_agreement": ((float, int), 1.0),
        "lowbit_max_relative_error": ((float, int), 0.05),
        "lowbit_min_cosine": ((float, int), 0.999),
    },
}
PRECISION_MODES = ("fp32",)
# How binary / ternary Linears are lowered. MatMulIntegerToFloat: uint8 activations x int8 codes,
# exact integer sums (MatMulNBits was measured and rejected: it re-quantizes activations per block).
LOWBIT_LINEAR_KERNELS = ("MatMulIntegerToFloat",)
OUTPUT_FORMATS = ("onnx",)


@dataclass(frozen=True)
class ParityTolerances:
    max_relative_error: float
    min_cosine: float
    min_argmax_agreement: float = 1.0
    min_router_agreement: float = 1.0
    # End to end, for graphs whose activations are quantized (see integer_parity.py for why).
    lowbit_max_relative_error: float = 0.05
    lowbit_min_cosine: float = 0.999


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    provider: str
    provider_options: dict[str, Any]
    dynamic_shapes: bool
    batch: int
    sequence: int
    precision: str
    lowbit_linear: str
    format: str
    shared_weights: bool
    parity: ParityTolerances
    source: Path = field(compare=False, default=Path())


def search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("EDGECOMPILE_TARGETS_PATH", "").split(os.pathsep) if p]
    dirs.append(Path(str(resources.files("edgecompile._targets"))))
    return dirs


def available_targets() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in search_dirs():
        for path in sorted(directory.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {float, int}:
        return "number"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "table"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _validated(path: Path, raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    values: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
    for key, value in raw.items():
        if isinstance(value, dict) and key in SCHEMA and key:
            section, items = key, value
        else:
            section, items = "", {key: value}
        for name, item in items.items():
            dotted = f"{section}.{name}" if section else name
            if name not in SCHEMA[section]:
                known = ", ".join(f"{section}.{k}" if section else k for k in SCHEMA[section])
                raise input_error(path, f"key '{dotted}'", f"one of {known}", "an unknown key")
            kind, _ = SCHEMA[section][name]
            if isinstance(item, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
                raise input_error(path, f"key '{dotted}'", _type_name(kind), f"boolean {item}")
            if not isinstance(item, kind):
                raise input_error(path, f"key '{dotted}'", _type_name(kind), f"{type(item).__name__} {item!r}")
            values[section][name] = item
    for section, keys in SCHEMA.items():
        for name, (_, default) in keys.items():
            if name not in values[section]:
                if default is REQUIRED:
                    dotted = f"{section}.{name}" if section else name
                    raise input_error(path, f"key '{dotted}'", "present", "missing")
                values[section][name] = default
    return values


def load_target_file(path: Path) -> Target:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: target file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not readable TOML ({one_line(exc)})") from None
    v = _validated(path, raw)
    if v["precision"]["mode"] not in PRECISION_MODES:
        raise input_error(path, "key 'precision.mode'", " or ".join(PRECISION_MODES), repr(v["precision"]["mode"]))
    if v["precision"]["lowbit_linear"] not in LOWBIT_LINEAR_KERNELS:
        raise input_error(path, "key 'precision.lowbit_linear'", " or ".join(LOWBIT_LINEAR_KERNELS), repr(v["precision"]["lowbit_linear"]))
    if v["output"]["format"] not in OUTPUT_FORMATS:
        raise input_error(path, "key 'output.format'", " or ".join(OUTPUT_FORMATS), repr(v["output"]["format"]))
    for key in ("batch", "sequence"):
        if v["shapes"][key] < 1:
            raise input_error(path, f"key 'shapes.{key}'", "a positive integer", v["shapes"][key])
    parity = ParityTolerances(**{k: float(x) for k, x in v["parity"].items()})
    return Target(
        name=v[""]["name"],
        description=v[""]["description"],
        provider=v["provider"]["name"],
        provider_options=dict(v["provider"]["options"]),
        dynamic_shapes=v["shapes"]["dynamic"],
        batch=v["shapes"]["batch"],
        sequence=v["shapes"]["sequence"],
        precision=v["precision"]["mode"],
        lowbit_linear=v["precision"]["lowbit_linear"],
        format=v["output"]["format"],
        shared_weights=v["output"]["shared_weights"],
        parity=parity,
        source=path,
    )


def load_target(name_or_path: str) -> Target:
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_target_file(Path(name_or_path))
    known = available_targets()
    if name_or_path not in known:
        raise InputError(
            f"--target: unknown target '{name_or_path}'; known targets: {', '.join(sorted(known)) or 'none'}"
        )
    return load_target_file(known[name_or_path])


def target_to_dict(target: Target) -> dict[str, Any]:
    """What a bundle records so `verify` can re-run parity exactly as the build did."""
    data = asdict(target)
    data.pop("source")
    return data


def target_from_dict(data: dict[str, Any]) -> Target:
    return Target(**{**data, "parity": ParityTolerances(**data["parity"])})
