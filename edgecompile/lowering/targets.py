"""Targets are data: one TOML file per target in targets/ (or any file a user points at).

`load_target("cpu")` finds `cpu.toml` among the shipped targets and the folders in
$EDGECOMPILE_TARGETS_PATH; `load_target("path/to/my.toml")` reads that file. Every key is
checked against SCHEMA: an unknown key or a wrong type is rejected naming the key. What a target
does to the graphs is its `lowering.steps` list (names from lowering.STEPS), not code branches.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecompile.errors import InputError, input_error, one_line

REQUIRED = object()
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a target's name is also its folder in the bundle
# section -> key -> (python type(s), default, allowed values or None)
SCHEMA: dict[str, dict[str, tuple[Any, Any, tuple | None]]] = {
    "": {"name": (str, REQUIRED, None), "description": (str, "", None)},
    "provider": {
        "name": (str, REQUIRED, None),
        "options": (dict, {}, None),
        # False: the EP cannot run on this machine; artifacts are checked on the CPU EP and the
        # report says so.
        "runs_here": (bool, True, None),
        # EP shipped as a plugin library by a Python package (onnxruntime >= 1.24 plugin EPs).
        "plugin_module": (str, "", None),
        "plugin_library": (str, "", None),  # function of plugin_module returning the library path
        "plugin_option_paths": (dict, {}, None),  # provider option -> function of plugin_module returning a path
        "install": (str, "", None),  # the command that provides the EP, shown when it is missing
    },
    "shapes": {"dynamic": (bool, True, None), "batch": (int, 1, None), "sequence": (int, 128, None)},
    "lowering": {"steps": (list, [], None)},
    "precision": {
        "mode": (str, "fp32", ("fp32", "qdq")),
        # qdq: activation / default weight types and calibration (onnxruntime.quantization)
        "activations": (str, "uint16", ("uint16", "uint8")),
        "weights": (str, "uint8", ("uint8",)),
        "matmul_weights": (str, "int8-per-channel", ("int8-per-channel", "per-tensor")),
        "calibration": (str, "minmax", ("minmax",)),
    },
    "output": {
        "format": (str, "onnx", ("onnx", "ort")),
        "shared_weights": (bool, True, None),
        "ort_level": (str, "basic", ("basic", "extended", "all")),
        "epcontext": (bool, False, None),
    },
    "parity": {
        "max_relative_error": ((float, int), REQUIRED, None),
        "min_cosine": ((float, int), REQUIRED, None),
        "min_argmax_agreement": ((float, int), 1.0, None),
        "min_router_agreement": ((float, int), 1.0, None),
        "lowbit_max_relative_error": ((float, int), 0.05, None),
        "lowbit_min_cosine": ((float, int), 0.999, None),
    },
    "placement": {
        # "session": ask onnxruntime (runs_here targets); otherwise a static checker by name
        "checker": (str, "session", ("session", "nnapi", "coreml-mlprogram", "coreml-neuralnetwork", "xnnpack")),
        # True: a graph with any node off the target EP fails the build (fallback disabled)
        "strict": (bool, False, None),
    },
}


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
    runs_here: bool
    plugin_module: str
    plugin_library: str
    plugin_option_paths: dict[str, str]
    install: str
    dynamic_shapes: bool
    batch: int
    sequence: int
    steps: tuple[str, ...]
    precision: str
    activations: str
    weights: str
    matmul_weights: str
    calibration: str
    format: str
    shared_weights: bool
    ort_level: str
    epcontext: bool
    placement_checker: str
    strict_placement: bool
    parity: ParityTolerances
    source: Path = field(compare=False, default=Path())

    @property
    def parity_provider(self) -> str:
        """The EP parity runs on: the target's own, or the CPU EP when it cannot run here."""
        return self.provider if self.runs_here else "CPUExecutionProvider"


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


def _type_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {float, int}:
        return "number"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "table", list: "array"}
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
            kind, _, allowed = SCHEMA[section][name]
            kinds = kind if isinstance(kind, tuple) else (kind,)
            if isinstance(item, bool) and bool not in kinds:
                raise input_error(path, f"key '{dotted}'", _type_name(kind), f"boolean {item}")
            if not isinstance(item, kind):
                raise input_error(path, f"key '{dotted}'", _type_name(kind), f"{type(item).__name__} {item!r}")
            if allowed is not None and item not in allowed:
                raise input_error(path, f"key '{dotted}'", " or ".join(repr(a) for a in allowed), repr(item))
            values[section][name] = item
    for section, keys in SCHEMA.items():
        for name, (_, default, _) in keys.items():
            if name not in values[section]:
                if default is REQUIRED:
                    dotted = f"{section}.{name}" if section else name
                    raise input_error(path, f"key '{dotted}'", "present", "missing")
                values[section][name] = default
    return values


def load_target_file(path: Path) -> Target:
    from edgecompile.lowering.steps import STEPS

    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: target file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"{path}: not readable TOML ({one_line(exc)})") from None
    v = _validated(Path(path), raw)
    if not NAME.match(v[""]["name"]):
        raise input_error(path, "key 'name'", "lowercase letters, digits, '-' or '_' (it names the bundle folder)", repr(v[""]["name"]))
    for key, value in v["parity"].items():
        bounded = key.startswith("min_")
        if not math.isfinite(value) or value < 0 or (bounded and value > 1):
            raise input_error(path, f"key 'parity.{key}'", "a finite number in [0, 1]" if bounded else "a finite number >= 0", value)
    for key in ("batch", "sequence"):
        if v["shapes"][key] < 1:
            raise input_error(path, f"key 'shapes.{key}'", "a positive integer", v["shapes"][key])
    for step in v["lowering"]["steps"]:
        if step not in STEPS:
            raise input_error(path, "key 'lowering.steps'", f"names among {', '.join(STEPS)}", repr(step))
    provider = v["provider"]
    return Target(
        name=v[""]["name"],
        description=v[""]["description"],
        provider=provider["name"],
        provider_options={k: str(x) for k, x in provider["options"].items()},
        runs_here=provider["runs_here"],
        plugin_module=provider["plugin_module"],
        plugin_library=provider["plugin_library"],
        plugin_option_paths={k: str(x) for k, x in provider["plugin_option_paths"].items()},
        install=provider["install"],
        dynamic_shapes=v["shapes"]["dynamic"],
        batch=v["shapes"]["batch"],
        sequence=v["shapes"]["sequence"],
        steps=tuple(v["lowering"]["steps"]),
        precision=v["precision"]["mode"],
        activations=v["precision"]["activations"],
        weights=v["precision"]["weights"],
        matmul_weights=v["precision"]["matmul_weights"],
        calibration=v["precision"]["calibration"],
        format=v["output"]["format"],
        shared_weights=v["output"]["shared_weights"],
        ort_level=v["output"]["ort_level"],
        epcontext=v["output"]["epcontext"],
        placement_checker=v["placement"]["checker"],
        strict_placement=v["placement"]["strict"],
        parity=ParityTolerances(**{k: float(x) for k, x in v["parity"].items()}),
        source=Path(path),
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
    data["steps"] = list(target.steps)
    return data


def target_from_dict(data: dict[str, Any]) -> Target:
    return Target(**{**data, "steps": tuple(data["steps"]), "parity": ParityTolerances(**data["parity"])})
