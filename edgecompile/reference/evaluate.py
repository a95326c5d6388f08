"""Run the PyTorch reference on parity samples: one sample at a time, unpadded.

Results are "reference outputs": {graph: {output: [array per sample]}} where per-token outputs
keep only the sample's real tokens. They are what every onnxruntime run is compared against,
and they are stored in the bundle so `edgecompile verify` can re-check without PyTorch models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from edgecompile.inputs.masks import ClusterMasks
from edgecompile.reference.masks import ModelGates
from edgecompile.reference.router import RouterModule
from edgecompile.inputs.tokens import Encoded

PER_TOKEN_OUTPUTS = frozenset({"last_hidden_state", "token_embeddings"})
Outputs = dict[str, list[np.ndarray]]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: reproducible sums, and no OpenMP spin-wait collapse on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tensors(sample: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(sample.input_ids)[None]
    return ids, torch.ones_like(ids), torch.from_numpy(sample.token_type_ids)[None]


@torch.no_grad()
def student_outputs(student: torch.nn.Module, samples: list[Encoded]) -> Outputs:
    """Every output (`student.output_names`) of a student module on each sample, unpadded."""
    outputs: Outputs = {name: [] for name in student.output_names}
    with single_thread():
        for sample in samples:
            for name, value in zip(student.output_names, student(*_tensors(sample))):
                outputs[name].append(value[0].numpy().copy())
    return outputs


def cluster_outputs(
    student: torch.nn.Module, gates: ModelGates, clusters: tuple[ClusterMasks, ...], samples: list[Encoded]
) -> dict[str, Outputs]:
    """Reference for the dense student and for each cluster (`gates`, installed on `student`, set per cluster)."""
    result = {"dense": student_outputs(student, samples)}
    try:
        for masks in clusters:
            gates.set(masks)
            result[f"cluster_{masks.index}"] = student_outputs(student, samples)
    finally:
        gates.remove()
    return result


@torch.no_grad()
def router_outputs(router: RouterModule, samples: list[Encoded]) -> Outputs:
    outputs: Outputs = {"cluster_id": [], "distances": []}
    with single_thread():
        for sample in samples:
            ids, mask, _ = _tensors(sample)
            cluster, distances = router(ids, mask)
            outputs["cluster_id"].append(cluster.numpy().copy())
            outputs["distances"].append(distances[0].numpy().copy())
    return outputs
