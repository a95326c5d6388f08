"""Last stage, shared by encoders and decoders: stage the bundle, build every target into it, gate on parity,
write the tokenizers, reference outputs, reports and manifest, commit (bundle/staging.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgecompile.build.request import BuildRequest, BuildResult, ValidatedInputs
from edgecompile.build.targets import TargetOutcome
from edgecompile.errors import ParityError
from edgecompile.lowering.targets import Target
from edgecompile.progress import Progress


@dataclass(frozen=True)
class Written:
    """What the targets wrote, for the manifest: per target its entry and each graph's bytes, every file's hash,
    the tokenizer folders and the reference files."""

    target_entries: dict[str, dict[str, Any]]
    graph_bytes: dict[str, dict[str, int]]
    files: dict[str, dict[str, Any]]
    tokenizers: dict[str, str]
    reference: dict[str, str]


class Pipeline(Protocol):
    """An encoder or decoder pipeline (build/encoder.py, build/decoder.py) once `prepare`d."""

    reference: dict[str, Any]  # what parity compares with
    stored_reference: dict[str, Any]  # what the bundle keeps of it, for `verify`
    student_tokenizer_files: tuple[Path, ...]

    def build_target(self, target: Target, root: Path) -> TargetOutcome: ...

    def manifest(self, written: Written) -> dict[str, Any]: ...


def publish(request: BuildRequest, inputs: ValidatedInputs, progress: Progress, pipeline: Pipeline) -> BuildResult:
    from edgecompile.bundle.staging import Staging
    from edgecompile.bundle.store import (
        REFERENCE_OUTPUTS, REFERENCE_SAMPLES, STUDENT_TOKENIZER, file_table, save_reference, write_json, write_tokenizers,
    )
    from edgecompile.check.parity import parity_json, parity_markdown, parity_table

    with Staging(Path(request.out), request.force) as staging:
        root = staging.root
        for folder in staging.removed_stale:
            progress.note(f"removed {folder} (left by an earlier build that was killed)")
        results, target_entries, graph_bytes = [], {}, {}
        try:
            for target in inputs.targets:
                outcome = pipeline.build_target(target, root)
                results.append(outcome.parity)
                target_entries[target.name] = outcome.entry
                graph_bytes[target.name] = outcome.graph_bytes
            table = parity_table(results)
            if not all(r.passed for r in results):
                (root / "parity.md").write_text(parity_markdown(table, inputs.targets, target_entries), encoding="utf-8")
                raise ParityError("parity failed; no bundle was written\n" + table)
        except ParityError as failure:
            if request.keep_failed:
                kept = staging.keep_as_failed()
                raise type(failure)(f"{str(failure).splitlines()[0]} (artifacts kept in {kept} for inspection)\n"
                                    + "\n".join(str(failure).splitlines()[1:])) from None
            raise

        with progress.step("writing tokenizers, reference outputs, reports and manifest"):
            router_tokenizer = write_tokenizers(root, pipeline.student_tokenizer_files, inputs.router.tokenizer_files())
            save_reference(root, inputs.samples.texts, pipeline.stored_reference)
            write_json(root / "parity.json", parity_json(results, {t.name: t for t in inputs.targets}))
            (root / "parity.md").write_text(parity_markdown(table, inputs.targets, target_entries), encoding="utf-8")
            written = Written(target_entries, graph_bytes, file_table(root), {"student": STUDENT_TOKENIZER, "router": router_tokenizer},
                              {"outputs": REFERENCE_OUTPUTS, "samples": REFERENCE_SAMPLES})
            manifest = pipeline.manifest(written)
            write_json(root / "manifest.json", manifest)
        staging.commit()
    return BuildResult(Path(request.out), True, table, manifest, dict(progress.timings))
