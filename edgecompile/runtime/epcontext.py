"""Cache a graph compiled for the target's EP (an EPContext model) so a device skips compilation.

onnxruntime's compile API writes one self-contained .onnx whose single EPContext node holds the
EP's compiled program (for QNN HTP: the context binary). Graph optimization must be at least
BASIC while compiling (QNN HTP failed to finalize at ORT_DISABLE_ALL, the API's default). The
cached graph is checked against the graph it came from: same inputs, identical outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecompile.errors import EdgecompileError, ParityError, one_line
from edgecompile.runtime.sessions import configure, create_session, session_options
from edgecompile.lowering.targets import Target


def compile_epcontext(source: Path, destination: Path, target: Target) -> None:
    options = session_options()
    configure(options, target, strict=True)
    try:
        compiler = ort.ModelCompiler(options, str(source), embed_compiled_data_into_model=True,
                                     graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        compiler.compile_to_file(str(destination))
    except Exception as exc:
        raise EdgecompileError(f"{source}: {target.provider} could not compile an EPContext model ({one_line(exc)})") from None


def check_same_outputs(source: Path, cached: Path, target: Target, feed: dict[str, np.ndarray]) -> None:
    original = create_session(source, target, strict=True)
    compiled = create_session(cached, target, strict=True)
    names = [i.name for i in original.get_inputs()]
    for name, a, b in zip([o.name for o in original.get_outputs()], original.run(None, {k: feed[k] for k in names}),
                          compiled.run(None, {k: feed[k] for k in names})):
        if not np.array_equal(a, b):
            raise ParityError(f"{cached}: output {name}: expected identical to {source.name}, found max difference "
                              f"{float(np.abs(a.astype(np.float64) - b).max()):.3g}")
