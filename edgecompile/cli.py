"""Command line: parse, call, print, exit. No compiler logic lives here.

Exit codes: 0 ok; 1 internal error; 2 bad input or usage; 3 parity failed;
4 missing dependency / environment; 5 bundle verification failed; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from edgecompile import __version__
from edgecompile.errors import BundleError, EdgecompileError, InputError, ParityError, is_disk_full, one_line

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_INTERRUPTED = 130
EXIT_ENVIRONMENT = 4
INTERRUPTED = "error: interrupted; nothing was written"


def _existing():
    # Existence and readability are checked by the loaders so messages keep one format.
    return click.Path(path_type=Path, readable=False)


CORES = os.cpu_count() or 1


def _threads(minimum: int) -> click.IntRange:
    """onnxruntime intra-op threads: at most this machine's cores (more only thrashes; 100000 took the machine down)."""
    return click.IntRange(minimum, CORES)


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Text options: bytes that are not UTF-8 reach Python as surrogates, which no tokenizer takes."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"--{param.name.replace('_', '-')}: expected UTF-8 text, found a byte that is not UTF-8 at "
                             f"character {exc.start}") from None
    return value


def _given(*names: str) -> list[str]:
    """The options among `names` the user gave on the command line (not defaults)."""
    ctx = click.get_current_context()
    return [f"--{n.replace('_', '-')}" for n in names if ctx.get_parameter_source(n) not in (
        click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP, None)]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgecompile")
def cli() -> None:
    """Compile compressed transformer students into verified ONNX bundles for edge devices.

    \b
    Typical use:
      edgecompile build STUDENT_DIR --masks masks.safetensors --router-encoder ENCODER_DIR --out bundle/
      edgecompile inspect bundle/
      edgecompile run bundle/ --text "How do I reset my password?"
    """


@cli.command()
@click.argument("student_dir", type=_existing())
@click.option("--masks", "masks", required=True, type=_existing(), help="edgecompile-masks/1 safetensors file (router centroids + per-cluster gates).")
@click.option("--router-encoder", required=True, type=_existing(), help="Router encoder: a sentence-transformers folder, or a static-embedding model saved by model2vec.")
@click.option("--router-layers", type=click.IntRange(min=1), default=None, help="Use only the router encoder's first N layers (a cheaper router; fit centroids for it).")
@click.option("--out", required=True, type=_existing(), help="Bundle folder to create (must not exist unless --force).")
@click.option("--target", "targets", multiple=True, default=("cpu",), show_default=True, help="Target name or path to a target .toml; repeat for several targets.")
@click.option("--samples", type=_existing(), default=None, help="UTF-8 text file, one input per line, for the parity check [default: built-in set].")
@click.option("--weights", type=click.Choice(["fp32", "int8", "int4"]), default=None,
              help="Decoders: Linear weights after pruning, block-quantized as onnxruntime-genai's builder does (MatMulNBits) "
                   "[default: each target's own, fp32 for cpu].")
@click.option("--chat-samples", is_flag=True, help="Decoders: each sample is a user turn of the student's chat template (as run --chat renders it).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--threads", type=_threads(0), default=0, show_default=True, help=f"onnxruntime intra-op threads for parity (0 = all cores; at most {CORES}).")
@click.option("--keep-failed", is_flag=True, help="On a parity or placement failure, keep the graphs in <out>.failed/ to inspect.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines; print only the parity table.")
def build(student_dir: Path, masks: Path, router_encoder: Path, router_layers: int | None, out: Path, targets: tuple[str, ...], samples: Path | None,
          weights: str | None, chat_samples: bool, force: bool, threads: int, keep_failed: bool, quiet: bool) -> None:
    """Export STUDENT_DIR once, rewrite one graph per cluster, build the router, prove parity, write the bundle.

    Exit code 0 means the bundle at --out is complete and passed parity on every target; any other exit
    code means --out was not created or changed.
    """
    from edgecompile import interrupt
    from edgecompile.build import BuildRequest
    from edgecompile.build import build as run_build
    from edgecompile.progress import Progress

    progress = Progress(quiet=quiet)
    request = BuildRequest(student_dir, masks, router_encoder, out, list(targets), samples, force, threads, keep_failed,
                           router_layers, chat_samples, weights)
    result = run_build(request, progress)
    if interrupt.requested():  # the signal came after the commit: say what is true on disk
        click.echo(f"note: interrupted after the bundle was written: {result.out} is complete and passed parity", err=True)
    click.echo(result.table)
    if not quiet:
        click.echo(f"\nbundle written to {result.out} in {progress.total:.1f} s (parity passed)", err=True)


@cli.command()
@click.argument("bundle_dir", type=_existing())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of a summary.")
def inspect(bundle_dir: Path, as_json: bool) -> None:
    """Summarise a bundle: clusters, what each keeps, sizes, MACs, parity."""
    from edgecompile.bundle.store import load_bundle
    from edgecompile.bundle.summary import bundle_summary

    bundle = load_bundle(bundle_dir)
    click.echo(json.dumps(bundle.manifest, indent=2) if as_json else bundle_summary(bundle))


@cli.command()
@click.argument("bundle_dir", type=_existing())
@click.option("--text", default=None, callback=_utf8, help="Encoder bundles: the input to route and run.")
@click.option("--prompt", default=None, callback=_utf8, help="Decoder bundles: the prompt to route and continue, as is.")
@click.option("--chat", default=None, callback=_utf8, help="Decoder bundles: a user message, rendered with the bundle's chat template.")
@click.option("--system", default=None, callback=_utf8, help="Decoder bundles, with --chat: a system message before it.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Decoder bundles: tokens to generate.")
@click.option("--speculative", is_flag=True, help="Decoder bundles with multi-token-prediction heads: draft with the extra heads, "
              "verify with the next-token head (tokens identical to greedy); prints acceptance and speed-up.")
@click.option("--graph", default=None, help="Decoder bundles: decode with this graph (dense, cluster_<k>) instead of the router's "
              "choice, to compare replies; the router's choice is still reported.")
@click.option("--target", default=None, help="Target folder of the bundle to use [default: the first].")
@click.option("--threads", type=_threads(0), default=0, show_default=True, help=f"0 = all cores; at most {CORES}.")
def run(bundle_dir: Path, text: str | None, prompt: str | None, chat: str | None, system: str | None, max_new_tokens: int,
        speculative: bool, graph: str | None, target: str | None, threads: int) -> None:
    """Route one input with router.onnx, run the chosen cluster, print JSON.

    Encoder bundles take --text and print the cluster's outputs; a text longer than a model's
    max_seq_length is cut to it, as an app would, and the JSON's `truncated` and a warning on stderr
    say so. Decoder bundles take --prompt (as is) or --chat (a user turn of the bundle's chat
    template, after --system if given) and print the reply greedily generated, its tokens, prefill ms,
    decode ms per token and tokens per second.
    """
    from edgecompile.bundle.store import load_bundle
    from edgecompile.serve.infer import route_and_run, truncation_warning

    bundle = load_bundle(bundle_dir)
    decoder = bundle.manifest["student"].get("task") == "causal-lm"
    if decoder:
        if (prompt is None) == (chat is None) or text is not None:
            raise click.UsageError("this is a decoder bundle: give --prompt or --chat (one of them; not --text)")
        if system is not None and chat is None:
            raise click.UsageError("--system: goes with --chat (a chat's system message), not with --prompt")
    else:
        if text is None or prompt is not None:
            raise click.UsageError("this is an encoder bundle: give --text (not --prompt)")
        if decoder_only := _given("max_new_tokens", "speculative", "chat", "system", "graph"):
            raise click.UsageError(f"{decoder_only[0]}: this is an encoder bundle; {decoder_only[0]} is for decoder bundles")
    if decoder:
        from edgecompile.serve.generate import route_and_generate

        result = route_and_generate(bundle, chat if prompt is None else prompt, max_new_tokens, target, threads, speculative,
                                    chat=prompt is None, system=system, graph=graph)
        click.echo(json.dumps(result))
        return
    result = route_and_run(bundle, text, target, threads)
    if warning := truncation_warning(result):
        click.echo(f"warning: {warning}", err=True)
    click.echo(json.dumps(result))


@cli.command()
@click.argument("bundle_dir", type=_existing())
@click.option("--target", "targets", multiple=True, help="Only these targets [default: all in the bundle].")
@click.option("--threads", type=_threads(0), default=0, show_default=True, help=f"0 = all cores; at most {CORES}.")
def verify(bundle_dir: Path, targets: tuple[str, ...], threads: int) -> None:
    """Re-check every file's sha256 and re-run parity against the stored PyTorch reference outputs."""
    from edgecompile.bundle.store import load_bundle
    from edgecompile.check.parity import parity_table
    from edgecompile.check.verify import verify_bundle

    bundle = load_bundle(bundle_dir)
    results = verify_bundle(bundle, list(targets) or None, threads)
    table = parity_table(results)
    if not all(r.passed for r in results):
        raise ParityError(f"{bundle_dir}: parity failed on this machine\n" + table)
    click.echo(table)
    click.echo(f"\n{bundle_dir}: all file hashes match and parity passed", err=True)


@cli.command()
@click.argument("bundle_dir", type=_existing())
@click.option("--target", default=None, help="Target folder of the bundle [default: the first].")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Batch of the per-graph timing [default: 1; fixed-shape targets: theirs, no other].")
@click.option("--sequence", type=click.IntRange(min=1), default=None, help="Sequence of the per-graph timing [default: 128; fixed-shape targets: theirs, no other].")
@click.option("--threads", type=_threads(1), default=1, show_default=True, help=f"At most {CORES}.")
@click.option("--runs", type=click.IntRange(min=3), default=50, show_default=True, help="Timed runs per graph and per routed input (round-robin).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--samples", type=_existing(), default=None, help="Texts, one per line, for the routed timing (encoders) or the speculative decoding of graphs with heads (decoders) [default: the build's samples].")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the report (with its metadata) as JSON here, and the plot beside it (.png).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write the plot (latency and MACs per graph, routed vs dense) to this PNG.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Decoder bundles: prompt length.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=64, show_default=True, help="Decoder bundles: tokens generated per run.")
def bench(bundle_dir: Path, target: str | None, batch: int | None, sequence: int | None, threads: int, runs: int,
          warmup: int, samples: Path | None, json_path: Path | None, plot_path: Path | None, prompt_tokens: int,
          new_tokens: int) -> None:
    """p50/p90 latency of every graph beside the dense export, and routed latency (router + the cluster it
    picks, per input) against dense on real texts.

    Decoder bundles: prefill ms and decode ms per token of every graph (greedy, onnxruntime); for graphs with
    multi-token-prediction heads, speculative decoding on the build's sample prompts (or --samples; chat turns when
    the tokenizer has a chat template): acceptance per head, and speed against greedy decoding of the same model
    with and without its heads. --runs rounds (default 5).
    """
    from edgecompile.bundle.store import load_bundle
    from edgecompile.serve.bench import bench_bundle, bench_table, write_plot
    from edgecompile.serve.bench_settings import BenchSettings

    derived_plot = plot_path is None and json_path is not None  # the plot goes beside the JSON: checked alike
    plot_path = plot_path or (json_path.with_suffix(".png") if json_path else None)
    for option, path in (("--json", json_path), ("--plot" if not derived_plot else "--json (its plot)", plot_path)):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            raise InputError(f"{path}: {option}: expected a file path in an existing folder, found "
                             f"{'a folder' if path.is_dir() else 'a missing parent folder'}")
        if path is not None and (bundle := _enclosing_bundle(path, bundle_dir)):
            raise InputError(f"{path}: {option}: expected a path outside any bundle, found one inside the bundle {bundle}")
    bundle = load_bundle(bundle_dir)
    decoder = bundle.manifest["student"].get("task") == "causal-lm"
    other_kind = _given("batch", "sequence", "plot_path") if decoder else _given("prompt_tokens", "new_tokens")
    if other_kind:
        option = other_kind[0].replace("--plot-path", "--plot")
        raise click.UsageError(f"{option}: this is {'a decoder' if decoder else 'an encoder'} bundle; {option} is for "
                               f"{'encoder' if decoder else 'decoder'} bundles")
    if decoder:
        from dataclasses import asdict

        from edgecompile.serve.bench_decoder import bench_decoder_bundle, decoder_bench_table

        runs = runs if click.get_current_context().get_parameter_source("runs").name != "DEFAULT" else 5
        settings = BenchSettings(threads=threads, runs=runs, warmup=min(warmup, 1), samples=samples,
                                 prompt_tokens=prompt_tokens, new_tokens=new_tokens)
        decoded = bench_decoder_bundle(bundle, target, settings)
        click.echo(decoder_bench_table(decoded, settings, target or bundle.targets[0]))
        if json_path:
            _write_atomically(json_path, json.dumps(asdict(decoded), indent=2) + "\n")
        return
    report = bench_bundle(bundle, target, BenchSettings(threads=threads, runs=runs, warmup=warmup, samples=samples,
                                                        batch=batch, sequence=sequence))
    click.echo(bench_table(report))
    if json_path:
        _write_atomically(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if plot_path:
        click.echo(f"plot written to {write_plot(report, plot_path)}", err=True)


def _enclosing_bundle(path: Path, bundle_dir: Path) -> Path | None:
    """The bundle a file written at `path` would land in (writing there would change or break it), if any."""
    from edgecompile.bundle.store import MANIFEST, SCHEMA_VERSION

    folders = {path.parent.resolve(), path.resolve().parent}  # the latter: a symbolic link at `path` is written through
    if any(folder.is_relative_to(bundle_dir.resolve()) for folder in folders):
        return bundle_dir
    for candidate in {c for folder in folders for c in (folder, *folder.parents)}:
        try:
            if json.loads((candidate / MANIFEST).read_text(encoding="utf-8")).get("schema") == SCHEMA_VERSION:
                return candidate
        except (OSError, ValueError, AttributeError):
            continue
    return None


def _write_atomically(path: Path, text: str) -> None:
    """A report appears whole or not at all (Ctrl-C or a full disk leave no half-written file)."""
    import tempfile

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@cli.command("compare-routers")
@click.argument("bundle_dirs", nargs=-1, required=True, type=_existing())
@click.option("--samples", type=_existing(), default=None, help="Texts, one per line [default: the first bundle's build samples].")
@click.option("--target", default=None, help="Target folder to run [default: the first bundle's first].")
@click.option("--threads", type=_threads(1), default=1, show_default=True, help=f"At most {CORES}.")
@click.option("--runs", type=click.IntRange(min=3), default=20, show_default=True, help="Timed runs per text and router.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the comparison as JSON here.")
def compare_routers(bundle_dirs: tuple[Path, ...], samples: Path | None, target: str | None, threads: int, runs: int,
                    json_path: Path | None) -> None:
    """The routers of BUNDLE_DIRS on the same texts: each one's cost (MACs, size, latency, share of the first
    bundle's dense latency) and, against the first, the share of texts sent to the same cluster."""
    from edgecompile.bundle.store import load_bundle
    from edgecompile.serve.compare_routers import compare_routers as run_comparison, comparison_table

    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        raise InputError(f"{json_path}: --json: expected a file path in an existing folder, found "
                         f"{'a folder' if json_path.is_dir() else 'a missing parent folder'}")
    for bundle_dir in bundle_dirs:
        if json_path is not None and (inside := _enclosing_bundle(json_path, bundle_dir)):
            raise InputError(f"{json_path}: --json: expected a path outside any bundle, found one inside the bundle {inside}")
    bundles = [load_bundle(d) for d in bundle_dirs]
    if decoders := [b.root for b in bundles if b.manifest["student"].get("task") == "causal-lm"]:
        raise click.UsageError(f"{decoders[0]}: this is a decoder bundle; compare-routers compares encoder bundles' routers "
                               "against their dense student (a decoder's router runs once per generation: see bench)")
    result = run_comparison(bundles, samples, target, threads, runs)
    click.echo(comparison_table(result))
    if json_path:
        _write_atomically(json_path, json.dumps(result.to_dict(), indent=2) + "\n")


@cli.command()
def targets() -> None:
    """List the known targets (shipped ones and those in $EDGECOMPILE_TARGETS_PATH)."""
    from edgecompile.lowering.targets import available_targets, load_target_file, shadowing_files

    for path in shadowing_files():
        click.echo(f"warning: {path}: named like the shipped target '{path.stem}', which it cannot replace; "
                   "rename it (and its 'name' key)", err=True)
    for name, path in available_targets().items():
        target = load_target_file(path)
        shapes = "dynamic" if target.dynamic_shapes else f"fixed {target.batch}x{target.sequence}"
        where = "runs here" if target.runs_here else "not runnable here (estimated placement, CPU parity)"
        precision = target.linear_weights.tag if target.linear_weights.quantizes else target.precision
        click.echo(f"{name:<14} {target.provider:<28} {precision:<5} {shapes:<14} {target.format:<5} "
                   f"onnxruntime >= {target.min_onnxruntime:<5} {where}\n{'':<14} {target.description}  [{path}]")


BUNDLE_READERS = ("inspect", "run", "verify", "bench", "compare-routers")
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _outcome(argv: list[str] | None) -> tuple[int, str | None]:
    """Run one command: (exit code, message for stderr)."""
    try:
        code = cli.main(args=argv, prog_name="edgecompile", standalone_mode=False)
        return (code if isinstance(code, int) else 0), None
    except click.exceptions.Abort:
        return EXIT_INTERRUPTED, INTERRUPTED
    except NO_ARGS_IS_HELP as exc:  # a bare `edgecompile`: the help is the answer
        exc.show()
        return exc.exit_code, None
    except click.UsageError as exc:  # one line, as every other error (click's own form takes four)
        command = exc.ctx.command_path if exc.ctx is not None else "edgecompile"
        return exc.exit_code, f"error: {one_line(exc.format_message())} (see '{command} --help')"
    except click.ClickException as exc:
        return exc.exit_code, f"error: {one_line(exc.format_message())}"
    except EdgecompileError as exc:
        return exc.exit_code, f"error: {exc}"
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED, INTERRUPTED
    except Exception as exc:
        if is_disk_full(exc):
            return EXIT_ENVIRONMENT, f"error: no space left on device ({one_line(exc)})"
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        if words[:1] and words[0] in BUNDLE_READERS:
            from edgecompile.runtime.sessions import onnxruntime_refused

            if onnxruntime_refused(exc):  # our graphs take what the manifest says they take: this bundle's disagree
                bundle = next((w for w in words[1:] if Path(w).is_dir()), "bundle")
                return BundleError.exit_code, (f"error: {bundle}: the bundle's graphs do not take the inputs "
                                               f"its manifest describes (onnxruntime: {one_line(exc)}); run `edgecompile verify`")
        raise


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and an exit code, never a traceback.

    Once a command's outcome is decided (a bundle committed, an error caught), a late Ctrl-C or
    SIGTERM changes neither the files nor the exit code, and prints no traceback at shutdown.
    """
    from edgecompile import interrupt

    previous = [(signum, signal.getsignal(signum)) for signum in (signal.SIGINT, signal.SIGTERM)]
    interrupt.install()
    try:
        try:
            code, message = _outcome(argv)
        except KeyboardInterrupt:  # the first signal arrived while an error was being turned into a message
            code, message = EXIT_INTERRUPTED, INTERRUPTED
        finally:
            interrupt.settle()
        if message:
            click.echo(message, err=True)
    finally:
        if argv is not None:  # called from Python (tests, embedding): the caller gets its handlers back
            for signum, handler in previous:
                signal.signal(signum, handler)
    sys.exit(code)


if __name__ == "__main__":
    main()
