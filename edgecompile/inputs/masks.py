"""The masks file: router centroids (+ optional projection) and per-cluster block / head / neuron gates.

Format `edgecompile-masks/1` (safetensors; see docs/inputs.md for the contract). After loading, every
cluster has all three gate tensors (absent ones are all-ones) with hard-concrete already applied,
so nothing downstream needs to know how the masks were stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecompile.errors import InputError, input_error, one_line
from edgecompile.inputs.student import StudentSpec

MASKS_FORMAT = "edgecompile-masks/1"
MASK_KINDS = ("hard", "hard_concrete_log_alpha")
METRICS = ("l2", "cosine")
# router.encoder.*: which router the centroids were fitted for (inputs/router.py checks them)
ROUTER_IDENTITY = ("router.encoder.kind", "router.encoder.width", "router.encoder.layers", "router.encoder.sha256",
                   "router.encoder.name")
KNOWN_METADATA = ("format", "mask.kind", "router.metric") + ROUTER_IDENTITY
GRANULARITIES = ("blocks", "heads", "neurons")
_CLUSTER_TENSOR = re.compile(r"^cluster\.(0|[1-9][0-9]*)\.([a-z]+)$")  # one spelling per index: no "cluster.00"


@dataclass(frozen=True)
class ClusterMasks:
    """Gates of one cluster, each value in [0, 1]: 0 removes the unit, other values scale it."""

    index: int
    blocks: np.ndarray  # [L, 2] float32: column 0 attention branch, column 1 FFN branch
    heads: np.ndarray  # [L, H]
    neurons: np.ndarray  # [L, I]
    given: tuple[str, ...] = ()  # which granularities the file declared


@dataclass(frozen=True)
class MaskSet:
    path: Path
    kind: str
    metric: str
    centroids: np.ndarray  # [K, D']
    projection_weight: np.ndarray | None  # [D', D]
    projection_bias: np.ndarray | None  # [D']
    clusters: tuple[ClusterMasks, ...] = field(default_factory=tuple)
    router_identity: dict[str, str] = field(default_factory=dict)  # metadata router.encoder.* (may be empty)

    @property
    def num_clusters(self) -> int:
        return len(self.clusters)


def _open(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    if not path.exists():
        raise InputError(f"{path}: masks file not found")
    if not path.is_file():
        raise input_error(path, "masks", "a safetensors file", "a folder")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:
        raise InputError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    return metadata, tensors


def _shape(array: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in array.shape) + "]"


def _check_tensor(path: Path, name: str, array: np.ndarray, shape: tuple[int, ...], *, unit_range: bool) -> None:
    if array.dtype != np.float32:
        raise input_error(path, f"tensor {name} dtype", "float32", array.dtype)
    if array.shape != shape:
        raise input_error(path, f"tensor {name} shape", _shape(np.empty(shape)), _shape(array))
    bad = ~np.isfinite(array)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise input_error(path, f"tensor {name}", "finite values", f"{array[where]} at {list(where)}")
    if unit_range:
        outside = (array < 0) | (array > 1)
        if outside.any():
            where = tuple(int(i) for i in np.argwhere(outside)[0])
            raise input_error(path, f"tensor {name}", "values in [0, 1]", f"{array[where]:g} at {list(where)}")


def load_masks(path: Path, student: StudentSpec, encoder_dim: int) -> MaskSet:
    """Read and validate a masks file against the student and the router encoder's embedding width."""
    path = Path(path)
    metadata, tensors = _open(path)

    fmt = metadata.get("format")
    if fmt != MASKS_FORMAT:
        raise input_error(path, "metadata 'format'", repr(MASKS_FORMAT), repr(fmt) if fmt is not None else "none")
    unknown = sorted(set(metadata) - set(KNOWN_METADATA))
    if unknown:
        raise input_error(path, "metadata", "keys among " + ", ".join(KNOWN_METADATA), f"unknown key {unknown[0]!r}")
    kind = metadata.get("mask.kind", "hard")
    if kind not in MASK_KINDS:
        raise input_error(path, "metadata 'mask.kind'", " or ".join(MASK_KINDS), repr(kind))
    metric = metadata.get("router.metric")
    if metric not in METRICS:
        raise input_error(path, "metadata 'router.metric'", " or ".join(METRICS), repr(metric) if metric else "none")

    centroids = tensors.get("router.centroids")
    if centroids is None:
        raise input_error(path, "tensor router.centroids", "float32 [K, D]", "none")
    if centroids.dtype != np.float32 or centroids.ndim != 2:
        raise input_error(path, "tensor router.centroids", "float32 [K, D]", f"{centroids.dtype} {_shape(centroids)}")
    if centroids.shape[0] == 0:
        raise input_error(path, "tensor router.centroids", "at least one centroid (K >= 1)", f"K = 0 {_shape(centroids)}")

    weight, bias = tensors.get("router.projection.weight"), tensors.get("router.projection.bias")
    if (weight is None) != (bias is None):
        missing = "router.projection.bias" if bias is None else "router.projection.weight"
        raise input_error(path, f"tensor {missing}", "present with its pair", "none")
    routed_dim = encoder_dim
    if weight is not None:
        if weight.ndim != 2:
            raise input_error(path, "tensor router.projection.weight shape", "[D', D]", _shape(weight))
        _check_tensor(path, "router.projection.weight", weight, (weight.shape[0], encoder_dim), unit_range=False)
        _check_tensor(path, "router.projection.bias", bias, (weight.shape[0],), unit_range=False)
        routed_dim = weight.shape[0]
    if centroids.shape[1] != routed_dim:
        source = "projection output" if weight is not None else "router encoder embedding"
        raise input_error(
            path, "tensor router.centroids shape", f"[K, {routed_dim}] ({source} width)", _shape(centroids)
        )
    _check_tensor(path, "router.centroids", centroids, centroids.shape, unit_range=False)

    expected = {
        "blocks": (student.num_layers, 2),
        "heads": (student.num_layers, student.num_heads),
        "neurons": (student.num_layers, student.intermediate_size),
    }
    num_centroids = centroids.shape[0]
    per_cluster: dict[int, dict[str, np.ndarray]] = {}
    for name, array in tensors.items():
        if name.startswith("router."):
            if name not in ("router.centroids", "router.projection.weight", "router.projection.bias"):
                raise input_error(path, f"tensor {name}", "a known router tensor", "an unknown name")
            continue
        match = _CLUSTER_TENSOR.match(name)
        if not match or match.group(2) not in GRANULARITIES:
            raise input_error(path, f"tensor {name}", "cluster.{k}.blocks|heads|neurons or router.*", "an unknown name")
        k, granularity = int(match.group(1)), match.group(2)
        if k >= num_centroids:  # checked first: every later step is bounded by K, never by a number in a name
            raise input_error(path, f"tensor {name}", f"a cluster id below K = {num_centroids} (one cluster per router.centroids row)", k)
        _check_tensor(path, name, array, expected[granularity], unit_range=(kind == "hard"))
        if granularity in per_cluster.get(k, {}):
            raise input_error(path, f"tensor {name}", f"one cluster.{k}.{granularity}", "a second tensor for it")
        per_cluster.setdefault(k, {})[granularity] = array

    found = sorted(per_cluster)
    if found != list(range(len(found))):
        missing = [f"cluster.{m}" for m in range(found[-1]) if m not in per_cluster]
        raise input_error(
            path, "cluster numbering", f"cluster.0 .. cluster.{len(found) - 1} without gaps" if found else "cluster.0 ..",
            f"clusters {_few(found)} (missing {_few(missing)})",
        )
    if len(found) < num_centroids:
        raise input_error(
            path, f"router.centroids row {len(found)}", f"masks cluster.{len(found)}.* for each of the K = {num_centroids} centroids", "no cluster"
        )

    clusters = []
    for k in found:
        given = per_cluster[k]
        gates = {}
        for granularity, shape in expected.items():
            array = given.get(granularity)
            if array is None:
                gates[granularity] = np.ones(shape, dtype=np.float32)
            elif kind == "hard_concrete_log_alpha":
                gates[granularity] = _hard_concrete(array)
            else:
                gates[granularity] = array.copy()
        clusters.append(ClusterMasks(k, gates["blocks"], gates["heads"], gates["neurons"], tuple(sorted(given))))
    identity = {key: metadata[key] for key in ROUTER_IDENTITY if key in metadata}
    return MaskSet(path, kind, metric, centroids.copy(), _copy(weight), _copy(bias), tuple(clusters), identity)


def _few(items: list, shown: int = 5) -> str:
    """At most `shown` items, then how many more: an error line stays one short line."""
    text = ", ".join(str(i) for i in items[:shown])
    return text + (f" (+{len(items) - shown} more)" if len(items) > shown else "")


def _copy(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else array.copy()


def _hard_concrete(log_alpha: np.ndarray) -> np.ndarray:
    import torch

    from edgecompile.numerics import hard_concrete_gate

    return hard_concrete_gate(torch.from_numpy(log_alpha)).numpy().astype(np.float32)
