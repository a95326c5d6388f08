"""`edgecompile build`, stage by stage: validate (validate.py) -> load -> export once -> rewrite one graph per
cluster -> lower per target -> check parity (encoder.py or decoder.py, by the family's task) -> publish
(publish.py: staging, manifest, atomic commit).

The bundle is assembled in a staging folder and renamed into `--out` only after every target's
parity passed; any failure (bad input, parity miss, Ctrl-C, SIGTERM) leaves `--out` untouched.
"""

from __future__ import annotations

from edgecompile.build.request import BuildRequest, BuildResult
from edgecompile.progress import Progress

__all__ = ["BuildRequest", "BuildResult", "build"]


def build(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    """One path for encoders and decoders: the family's task picks the pipeline, publish is shared."""
    from edgecompile.build.publish import publish
    from edgecompile.build.validate import describe, validate_inputs

    progress = progress or Progress(quiet=True)
    with progress.step("validating inputs"):
        inputs = validate_inputs(request)
        describe(inputs, progress)
    if inputs.student.is_decoder:
        from edgecompile.build.decoder import DecoderPipeline as Pipeline
    else:
        from edgecompile.build.encoder import EncoderPipeline as Pipeline
    pipeline = Pipeline(request, inputs, progress)
    pipeline.prepare()
    return publish(request, inputs, progress, pipeline)
