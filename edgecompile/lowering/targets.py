"""Targets are data: one TOML file per target in targets/ (or any file a user points at).

`load_target("cpu")` finds `cpu.toml` among the shipped targets and the folders in
$EDGECOMPILE_TARGETS_PATH (a file there cannot replace a shipped target: that is an error);
`load_target("path/to/my.toml")` reads that file. Every key is checked against SCHEMA: an unknown
key or a wrong type is rejected naming the key. What a target does to the graphs is its
`lowering.steps` list (names from lowering.STEPS), not code branches. A target file names no code:
execution-provider plugins come from edgecompile's own list (PLUGIN_EPS below), by provider name.

A bundle records the target it was built for, but reading a bundle never trusts that record:
`target_from_dict` looks the target up by name among this tool's targets (see its docstring).
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


@dataclass(frozen=True)
class PluginEP:
    """An EP shipped as a plugin library by a Python package."""

    module: str  # the package's import name
    library: str  # its function returning the EP library's path
    option_paths: tuple[tuple[str, str], ...]  # (provider option, its function returning a path)
    install: str


# The only modules reaching an EP may import, and the only functions it may call.
PLUGIN_EPS: dict[str, PluginEP] = {
    "QNNExecutionProvider": PluginEP("onnxruntime_qnn", "get_library_path", (("backend_path", "get_qnn_htp_path"),),
                                     "pip install onnxruntime-qnn"),
}

REQUIRED = object()
# Keys of earlier versions that named a module and functions to import and call: refused, see PLUGIN_EPS.
PLUGIN_KEYS = ("plugin_module", "plugin_library", "plugin_option_paths")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # a target's name is also its folder in the bundle
# section -> key -> (python type(s), default, allowed values or None)
SCHEMA: dict[str, dict[str, tuple[Any, Any, tuple | None]]] = {
    "": {"name": (str, REQUIRED, None), "description": (str, "", None),
         # the oldest onnxruntime the target's files must load on (see lowering/runtime_floor.py)
         "min_onnxruntime": (str, "1.20", None)},
    "provider": {
        "name": (str, REQUIRED, None),
        "options": (dict, {}, None),
        # False: the EP cannot run on this machine; artifacts are checked on the CPU EP and the
        # report says so.
        "runs_here": (bool, True, None),
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
    # Linear weights after pruning (decoders): "int4" / "int8" are block-wise MatMulNBits as onnxruntime-genai's builder
    # writes them, with activations quantized per block at `accuracy_level` 4; binary / ternary students keep the exact
    # integer contract (`lowbit_kernel` "integer") or take exact 2-bit MatMulNBits codes ("nbits"), optionally through
    # onnxruntime's lookup-table GEMM (`lut_gemm`, session config mlas.use_lut_gemm).
    "weights": {
        "format": (str, "fp32", ("fp32", "int8", "int4")),
        "block_size": (int, 32, (16, 32, 64, 128, 256)),
        "accuracy_level": (int, 4, (0, 1, 2, 3, 4)),
        "lowbit_kernel": (str, "integer", ("integer", "nbits")),
        "lowbit_block_size": (int, 64, (16, 32, 64, 128, 256)),
        "lut_gemm": (bool, False, None),
        # the unembedding (lm_head, and a tied embedding through its blob) in other bits than the Linears: "same" or a format
        "lm_head_format": (str, "same", ("same", "int8", "int4")),
    },
    "parity": {
        "max_relative_error": ((float, int), REQUIRED, None),
        "min_cosine": ((float, int), REQUIRED, None),
        "min_argmax_agreement": ((float, int), 1.0, None),
        "min_router_agreement": ((float, int), 1.0, None),
        "lowbit_max_relative_error": ((float, int), 0.05, None),
        "lowbit_min_cosine": ((float, int), 0.999, None),
        # graphs whose weights are quantized block-wise (weights.format int4 / int8, or lowbit_kernel nbits), against
        # PyTorch with the same dequantized weights: the kernels quantize activations per block (accuracy_level 4)
        "quantized_max_relative_error": ((float, int), 0.5, None),
        "quantized_min_cosine": ((float, int), 0.99, None),
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
    # Graphs with block-quantized weights, against PyTorch with the same dequantized weights.
    quantized_max_relative_error: float = 0.5
    quantized_min_cosine: float = 0.99


def is_lower_bound(key: str) -> bool:
    """min_* and lowbit_min_* tolerances are fractions a result must reach; the others bound an error from above."""
    return key.removeprefix("lowbit_").startswith("min_")


@dataclass(frozen=True)
class WeightFormat:
    """How a target stores Linear weights after pruning (the [weights] table)."""

    format: str = "fp32"  # "fp32" | "int8" | "int4"
    block_size: int = 32
    accuracy_level: int = 4
    lowbit_kernel: str = "integer"  # binary / ternary Linears: "integer" (exact XTC contract) | "nbits" (2-bit MatMulNBits)
    lowbit_block_size: int = 64
    lut_gemm: bool = False  # onnxruntime's lookup-table GEMM for 2-bit MatMulNBits (session config mlas.use_lut_gemm)
    lm_head_format: str = "same"  # "same" | "int8" | "int4": the unembedding's own bits (a tied embedding reads its blob)

    @property
    def bits(self) -> int | None:
        return {"int4": 4, "int8": 8}.get(self.format)

    @property
    def lm_head_bits(self) -> int | None:
        return self.bits if self.lm_head_format == "same" or self.bits is None else {"int4": 4, "int8": 8}[self.lm_head_format]

    @property
    def quantizes(self) -> bool:
        """Whether the quantize_weights step changes anything (block-quantized or exact 2-bit weights)."""
        return self.format != "fp32" or self.lowbit_kernel == "nbits"

    @property
    def tag(self) -> str:
        """Names this format's reference outputs in a bundle (`dense~int4`): one per format, shared by its targets."""
        lm_head = f"+lm_head_{self.lm_head_format}" if self.bits and self.lm_head_bits != self.bits else ""
        return self.format + lm_head + ("+nbits" if self.lowbit_kernel == "nbits" else "")

    def session_config(self) -> dict[str, str]:
        """Session config entries the files need (onnxruntime's and onnxruntime-genai's sessions alike)."""
        return {"mlas.use_lut_gemm": "1"} if self.lut_gemm else {}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    provider: str
    provider_options: dict[str, Any]
    runs_here: bool
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
    min_onnxruntime: str = "1.20"
    linear_weights: WeightFormat = field(default_factory=lambda: WeightFormat())  # the [weights] table

    @property
    def parity_provider(self) -> str:
        """The EP parity runs on: the target's own, or the CPU EP when it cannot run here."""
        return self.provider if self.runs_here else "CPUExecutionProvider"


def shipped_dir() -> Path:
    return Path(str(resources.files("edgecompile._targets")))


def user_dirs() -> list[Path]:
    return [Path(p) for p in os.environ.get("EDGECOMPILE_TARGETS_PATH", "").split(os.pathsep) if p]


def shipped_targets() -> dict[str, Path]:
    return {path.stem: path for path in sorted(shipped_dir().glob("*.toml"))}


def shadowing_files() -> list[Path]:
    """Files in $EDGECOMPILE_TARGETS_PATH named like a shipped target (which they cannot replace)."""
    shipped = shipped_targets()
    return [path for directory in user_dirs() for path in sorted(directory.glob("*.toml")) if path.stem in shipped]


def available_targets() -> dict[str, Path]:
    """Shipped targets, then the user's ($EDGECOMPILE_TARGETS_PATH, first folder wins) under other names."""
    found = shipped_targets()
    for directory in user_dirs():
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
            if section == "provider" and name in PLUGIN_KEYS:
                raise input_error(path, f"key '{dotted}'", "no plugin keys: edgecompile loads execution-provider plugins "
                                  f"by provider name from its own list ({', '.join(PLUGIN_EPS)})", repr(item))
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
        bounded = is_lower_bound(key)
        if not math.isfinite(value) or value < 0 or (bounded and value > 1):
            raise input_error(path, f"key 'parity.{key}'", "a finite number in [0, 1]" if bounded else "a finite number >= 0", value)
    for key in ("batch", "sequence"):
        if v["shapes"][key] < 1:
            raise input_error(path, f"key 'shapes.{key}'", "a positive integer", v["shapes"][key])
    for step in v["lowering"]["steps"]:
        if step not in STEPS:
            raise input_error(path, "key 'lowering.steps'", f"names among {', '.join(STEPS)}", repr(step))
    from edgecompile.lowering.runtime_floor import check_floor

    check_floor(Path(path), v[""]["min_onnxruntime"], v["lowering"]["steps"])
    provider = v["provider"]
    return Target(
        name=v[""]["name"],
        description=v[""]["description"],
        provider=provider["name"],
        provider_options={k: str(x) for k, x in provider["options"].items()},
        runs_here=provider["runs_here"],
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
        min_onnxruntime=v[""]["min_onnxruntime"],
        linear_weights=WeightFormat(**v["weights"]),
    )


def load_target(name_or_path: str) -> Target:
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return _check_known_name(Path(name_or_path), load_target_file(Path(name_or_path)))
    known = available_targets()
    if name_or_path not in known:
        raise InputError(
            f"--target: unknown target '{name_or_path}'; known targets: {', '.join(sorted(known)) or 'none'}"
        )
    for path in shadowing_files():
        if path.stem == name_or_path:
            raise InputError(f"{path}: named like the shipped target '{name_or_path}', which a file in "
                             "$EDGECOMPILE_TARGETS_PATH cannot replace; rename it (and its 'name' key)")
    target = load_target_file(known[name_or_path])
    if target.name != name_or_path:
        raise input_error(known[name_or_path], "key 'name'", f"'{name_or_path}' (its file name, by which it was found)",
                          repr(target.name))
    return target


def _check_known_name(path: Path, target: Target) -> Target:
    """A target file given by path under the name of a known target (a copy of cpu.toml, say) builds a bundle that
    `verify` holds to the known definition, looked up by name: its provider must be that target's and its
    tolerances at least as strict, or the bundle could never verify."""
    from edgecompile.errors import BundleError, EnvironmentProblem

    known = available_targets().get(target.name)
    if known is None or known.resolve() == path.resolve():
        return target
    try:
        target_from_dict(target_to_dict(target), f"{path}: target")
    except (BundleError, EnvironmentProblem) as exc:
        raise InputError(f"{exc}; a bundle records its target by name and `verify` checks it against {known}: "
                         "rename this target (its 'name' key) or keep that provider and tolerances") from None
    return target


def target_to_dict(target: Target) -> dict[str, Any]:
    """What a bundle records: the whole definition, for people and for `verify` to compare against."""
    data = asdict(target)
    data.pop("source")
    data["steps"] = list(target.steps)
    return data


def target_from_dict(recorded: Any, where: str | None = None) -> Target:
    """The target a bundle was built for, as THIS edgecompile defines it (reading a bundle trusts no record).

    The target is looked up by the recorded name among this tool's targets (shipped, then
    $EDGECOMPILE_TARGETS_PATH); its provider, provider options, plugin, placement rules and
    tolerances come from that definition. The record supplies only what describes the files
    (dynamic or fixed shapes) and tolerances that are at least as strict as the tool's; a different
    provider or a looser tolerance is an inconsistency (BundleError, exit 5).
    """
    from dataclasses import fields, replace

    from edgecompile.errors import BundleError, EnvironmentProblem

    name = recorded.get("name") if isinstance(recorded, dict) else None
    where = where or f"manifest.json: targets.{name if isinstance(name, str) and NAME.match(name) else '?'}.target"
    if not isinstance(name, str) or not NAME.match(name):
        raise BundleError(f"{where}.name: expected a target name, found {name!r}"[:300])
    if name not in available_targets():
        raise EnvironmentProblem(f"{where}.name: '{name}' is not a target this edgecompile knows "
                                 f"({', '.join(sorted(available_targets()))}); add its .toml to $EDGECOMPILE_TARGETS_PATH")
    tool = load_target(name)
    if recorded.get("provider") != tool.provider:
        raise BundleError(f"{where}.provider: expected {tool.provider!r} (target '{name}' of this edgecompile), "
                          f"found {recorded.get('provider')!r}"[:300])
    parity = recorded.get("parity", {})
    if not isinstance(parity, dict):
        raise BundleError(f"{where}.parity: expected a table of tolerances, found {parity!r}"[:300])
    tolerances = {}
    for key in (f.name for f in fields(ParityTolerances)):
        rule, value = getattr(tool.parity, key), parity.get(key, getattr(tool.parity, key))
        bounded = is_lower_bound(key)  # the ranges load_target_file enforces
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                bounded and value > 1):
            raise BundleError(f"{where}.parity.{key}: expected a finite number "
                              f"{'in [0, 1]' if bounded else '>= 0'}, found {value!r}"[:300])
        at_most = not bounded  # max_* and lowbit_max_* bound an error from above
        if (value > rule) if at_most else (value < rule):
            raise BundleError(f"{where}.parity.{key}: expected {'at most' if at_most else 'at least'} {rule:g} "
                              f"(target '{name}' of this edgecompile), found {value:g}")
        tolerances[key] = float(value)
    shapes = {"dynamic_shapes": recorded.get("dynamic_shapes"), "batch": recorded.get("batch"), "sequence": recorded.get("sequence")}
    if not isinstance(shapes["dynamic_shapes"], bool) or not all(
            isinstance(shapes[k], int) and not isinstance(shapes[k], bool) and shapes[k] >= 1 for k in ("batch", "sequence")):
        raise BundleError(f"{where}: dynamic_shapes, batch, sequence: expected a boolean and two positive integers, "
                          f"found {shapes!r}"[:300])
    return replace(tool, parity=ParityTolerances(**tolerances), **shapes, linear_weights=recorded_weights(recorded, where))


def recorded_weights(recorded: dict[str, Any], where: str) -> WeightFormat:
    """The weight format a bundle's files were written in (it describes the files, like their shapes): values a
    target file could hold, else BundleError. Bundles from before the [weights] table record none: fp32."""
    from dataclasses import fields

    from edgecompile.errors import BundleError

    data = recorded.get("linear_weights", {})
    if not isinstance(data, dict) or set(data) - {f.name for f in fields(WeightFormat)}:
        raise BundleError(f"{where}.linear_weights: expected the keys of a target's [weights] table, found {data!r}"[:300])
    for key, value in data.items():
        kind, _, allowed = SCHEMA["weights"][key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind) or (allowed and value not in allowed):
            raise BundleError(f"{where}.linear_weights.{key}: expected {' or '.join(map(repr, allowed)) if allowed else _type_name(kind)}, "
                              f"found {value!r}"[:300])
    return WeightFormat(**data)
