"""Where every file of a bundle lives: the one resolution of a graph name to its file.

`build` writes each graph at the path named here and every reading command (`run`, `bench`, `verify`,
`compare-routers`) opens it at that path; the manifest's `file` entries must agree, so a manifest
cannot point a graph at another file of the bundle (`store._check_manifest`). Names only: nothing
here reads a file.
"""

from __future__ import annotations

import json
import re

MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"  # the only external-data file a graph may read, beside it
DECODER_FOLDER = "decoder"  # a decoder target's onnxruntime-genai model folder
GENAI_CONFIG = "genai_config.json"
DEFAULT_GRAPH = "dense"  # the graph onnxruntime-genai runs when no overlay picks another
# router.onnx, dense.onnx, cluster_<k>.onnx: graph names are file names, so they are plain names by construction
GRAPH_NAME = re.compile(r"router|dense|cluster_(0|[1-9][0-9]{0,5})")


def graph_file(target: str, graph: str, *, decoder: bool, extension: str = "onnx") -> str:
    """A graph's file relative to the bundle root (decoder graphs live in the target's onnxruntime-genai folder)."""
    if decoder and graph != "router":
        return f"{target}/{DECODER_FOLDER}/{graph}.onnx"
    return f"{target}/{graph}.{extension}"


def epcontext_file(target: str, graph: str) -> str:
    return f"{target}/{graph}.ctx.onnx"


def genai_folder(target: str) -> str:
    return f"{target}/{DECODER_FOLDER}"


def genai_overlay(graph: str) -> str:
    """The onnxruntime-genai config overlay that selects one graph of a decoder folder."""
    return json.dumps({"model": {"decoder": {"filename": f"{graph}.onnx"}}})
