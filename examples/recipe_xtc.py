"""Recipe 2: XTC-style distillation of a binary (1-bit weights, 8-bit activations) student, compiled by edgecompile.

Task: which module family of the Python standard library a docstring comes from (examples/corpus.py).
1. Teacher: all-MiniLM-L6-v2 + a classification head (BERT pooler + classifier) trained on the frozen
   encoder's [CLS] states, saved as a BertForSequenceClassification checkpoint.
2. Student: layer reduction (3 of 6 layers by default, teacher layers 1, 3, 5), every encoder Linear
   binarized (sign * mean|W| per row) with 8-bit dynamic activations, and 1-bit word embeddings, all by
   straight-through estimators (edgecompile.reference.lowbit_training, on the rules of reference/lowbit.py).
3. Distillation on hidden states (embeddings and each student layer against its teacher layer), attention
   maps, and logits (soft cross-entropy). `--schedule single-stage` (XTC's finding: one stage with all
   three losses is enough), `two-stage` (I: hidden + attention, II: logits) or `three-stage` (I, then all
   three, then logits), over the same total number of steps.
4. Accuracy on held-out texts of the teacher, the trained student, and the same student binarized
   without training, each evaluated exactly as `edgecompile build`'s parity oracle runs it (the saved
   checkpoint + sidecar, quantized by edgecompile.inputs.lowbit, QuantLinear integer arithmetic).
5. `edgecompile build` compiles teacher and student (W1A8 integer kernels); sizes and latency side by side.

    python examples/recipe_xtc.py                          # defaults (minutes on 2 cores)
    python examples/recipe_xtc.py --schedule two-stage
    python examples/recipe_xtc.py --short                  # seconds: checks the pipeline, figures meaningless
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CORPUS_FILE, FAMILIES, load_corpus, split, spread  # noqa: E402
from common import (OUT, RecipeParser, add_run_arguments, build_bundle, cpu_flags, cycle_shuffled, done,  # noqa: E402
                    finished, length_batches, minilm, phase, require, require_file, run_recipe,
                    write_trivial_masks)

from edgecompile.inputs.lowbit import read_sidecar  # noqa: E402
from edgecompile.reference.lowbit_plan import materialize, resolve_plan  # noqa: E402
from edgecompile.families import load_student  # noqa: E402
from edgecompile.inputs.tokens import load_tokenizer  # noqa: E402
from edgecompile.reference.lowbit import QuantizedLinears  # noqa: E402
from edgecompile.reference.lowbit_training import LowBitTraining  # noqa: E402
from edgecompile.families.bert_model import load_student_module  # noqa: E402

# Every encoder Linear (attention Q/K/V and output, FFN in and out); pooler and classifier stay fp32.
LINEARS = ["bert.encoder.layer.*.attention.self.*", "bert.encoder.layer.*.attention.output.dense",
           "bert.encoder.layer.*.intermediate.dense", "bert.encoder.layer.*.output.dense"]
SCHEDULES = {  # stage -> losses, each stage an equal share of --steps
    "single-stage": [("hidden", "attention", "logits")],
    "two-stage": [("hidden", "attention"), ("logits",)],
    "three-stage": [("hidden", "attention"), ("hidden", "attention", "logits"), ("logits",)],
}


def parse_args(argv: list[str] | None):
    parser = RecipeParser(prog="recipe_xtc.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="sentence-transformers BERT folder, the teacher's encoder [default: all-MiniLM-L6-v2]")
    parser.add_argument("--corpus", type=Path, default=CORPUS_FILE, help="corpus JSONL (examples/corpus.py) [default: %(default)s]")
    parser.add_argument("--teacher-layers", type=str, default=None, help="teacher layers the student starts from, e.g. 1,3,5 [default: every other layer from 1]")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="single-stage", help="[default: %(default)s]")
    parser.add_argument("--steps", type=int, default=360, help="student training steps over all stages [default: %(default)s]")
    parser.add_argument("--lr", type=float, default=1e-4, help="student AdamW learning rate (linear decay) [default: %(default)s]")
    parser.add_argument("--head-epochs", type=int, default=60, help="epochs of the teacher head on cached [CLS] states [default: %(default)s]")
    parser.add_argument("--fp32-embeddings", action="store_true", help="keep the word embeddings fp32 (default: 1-bit, as XTC)")
    parser.add_argument("--batch-size", type=int, default=16, help="[default: %(default)s]")
    parser.add_argument("--max-length", type=int, default=64, help="[default: %(default)s]")
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many train and held-out texts each [default: all]")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the student's gradient norm (transformers' Trainer default; 0 = no clipping) [default: %(default)s]")
    parser.add_argument("--bench-runs", type=int, default=50, help="round-robin latency runs [default: %(default)s]")
    parser.add_argument("--out", type=Path, default=OUT / "xtc", help="output folder [default: %(default)s]")
    add_run_arguments(parser, "40 texts, 3 steps")
    args = parser.parse_args(argv)
    if args.short:
        args.steps, args.head_epochs, args.max_texts, args.bench_runs = 3, 2, 40, 3
    for name in ("steps", "head_epochs", "batch_size", "max_length", "threads", "bench_runs"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')}", "at least 1", getattr(args, name))
    require(args.lr > 0, "--lr", "a positive number", args.lr)
    require(args.max_grad_norm >= 0, "--max-grad-norm", "a number >= 0", args.max_grad_norm)
    require_file(args.corpus, "the corpus JSONL")
    return args


def parse_layers(text: str | None, teacher_layers: int) -> list[int]:
    if text is None:
        return list(range(1, teacher_layers, 2)) or [0]
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        layers = []
    require(bool(layers) and layers == sorted(set(layers)) and 0 <= layers[0] and layers[-1] < teacher_layers,
            "--teacher-layers", f"increasing layer indices in 0..{teacher_layers - 1}, comma-separated", repr(text))
    return layers


def make_teacher(encoder_dir: Path, labels: list[str]):
    from transformers import BertForSequenceClassification

    id2label = dict(enumerate(labels))
    model = BertForSequenceClassification.from_pretrained(
        str(encoder_dir), num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        attn_implementation="eager", local_files_only=True)
    return model


def train_head(teacher, batches: list, labels: torch.Tensor, epochs: int, seed: int) -> None:
    """Pooler + classifier on cached [CLS] states of the frozen encoder (cheap: one encoder pass)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        cls = torch.zeros(len(labels), teacher.config.hidden_size)
        for b in batches:
            cls[b["index"]] = teacher.bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                           token_type_ids=b["token_type_ids"]).last_hidden_state[:, 0]
    head = [*teacher.bert.pooler.parameters(), *teacher.classifier.parameters()]
    optimizer = torch.optim.AdamW(head, lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    teacher.train()
    for _ in range(epochs):
        for chunk in np.array_split(rng.permutation(len(labels)), max(1, len(labels) // 64)):
            pooled = teacher.bert.pooler.activation(teacher.bert.pooler.dense(cls[chunk]))
            loss = F.cross_entropy(teacher.classifier(teacher.dropout(pooled)), labels[chunk])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    teacher.eval()


def make_student(teacher, layers: list[int]):
    from transformers import BertForSequenceClassification

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    config._attn_implementation = "eager"
    student = BertForSequenceClassification(config)
    state = {k: v for k, v in teacher.state_dict().items() if ".encoder.layer." not in k}
    for j, i in enumerate(layers):
        prefix = f"bert.encoder.layer.{i}."
        state.update({f"bert.encoder.layer.{j}.{k[len(prefix):]}": v for k, v in teacher.state_dict().items() if k.startswith(prefix)})
    student.load_state_dict(state, strict=True)
    return student


def save_student(student, tokenizer_dir: Path, out: Path, binary_embeddings: bool) -> Path:
    """Latent floats + the sidecar declaring what is 1-bit: exactly what `edgecompile build` reads."""
    if out.exists():
        shutil.rmtree(out)
    student.save_pretrained(str(out), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    sidecar = {"format": "edgecompile-lowbit/1",
               "linear": [{"modules": LINEARS, "bits": 1, "groups": "row", "activations": "dynamic"}]}
    if binary_embeddings:
        sidecar["word_embeddings"] = {"bits": 1}
    (out / "edgecompile.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    return out


def distillation_losses(student_out, teacher_out, layers: list[int], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    tokens = mask.unsqueeze(-1).float()
    count = tokens.sum() * student_out.hidden_states[0].shape[-1]
    pairs = [(0, 0)] + [(j + 1, i + 1) for j, i in enumerate(layers)]  # embeddings, then each student layer
    hidden = sum(((student_out.hidden_states[s] - teacher_out.hidden_states[t]) ** 2 * tokens).sum() / count for s, t in pairs)
    rows = mask[:, None, :, None].float()  # real query positions
    attention = 0.0
    for j, i in enumerate(layers):  # KL(teacher || student) per query row, as in MiniLM's attention transfer
        t, s = teacher_out.attentions[i], student_out.attentions[j]
        kl = (t * (torch.log(t.clamp(min=1e-9)) - torch.log(s.clamp(min=1e-9)))).sum(-1, keepdim=True)
        attention = attention + (kl * rows).sum() / (rows.sum() * t.shape[1])
    logits = -(F.softmax(teacher_out.logits, -1) * F.log_softmax(student_out.logits, -1)).sum(-1).mean()
    return {"hidden": hidden, "attention": attention, "logits": logits}


def train_student(student, teacher, batches: list, layers: list[int], args) -> None:
    torch.manual_seed(args.seed)
    training = LowBitTraining(student, LINEARS, bits=1, activations="dynamic", embedding_bits=None if args.fp32_embeddings else 1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / args.steps)
    stages = SCHEDULES[args.schedule]
    stream = cycle_shuffled(batches, args.seed)
    student.train()
    step = 0
    for number, losses in enumerate(stages, 1):
        stage_steps = args.steps // len(stages) + (1 if number <= args.steps % len(stages) else 0)
        log: dict[str, list[float]] = {name: [] for name in ("hidden", "attention", "logits")}
        for _ in range(stage_steps):
            b = next(stream)
            inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                          output_hidden_states=True, output_attentions=True)
            with torch.no_grad():
                teacher_out = teacher(**inputs)
            parts = distillation_losses(student(**inputs), teacher_out, layers, b["attention_mask"])
            loss = sum(parts[name] for name in losses)
            optimizer.zero_grad()
            loss.backward()
            if args.max_grad_norm > 0:  # binarized students' logits swing by tens between steps without it
                torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            for name, value in parts.items():
                log[name].append(float(value.detach()))
            if step % max(1, args.steps // 10) == 0:
                print(f"    step {step}/{args.steps}: " + ", ".join(f"{name} {values[-1]:.4f}" for name, values in log.items()), flush=True)
        tail = {name: np.mean(values[-20:]) for name, values in log.items()}
        head = {name: np.mean(values[:5]) for name, values in log.items()}
        print("  first-5 mean " + ", ".join(f"{name} {value:.4f}" for name, value in head.items()))
        print(f"  stage {number}/{len(stages)} ({'+'.join(losses)}, {stage_steps} steps, up to step {step}): last-20 mean "
              + ", ".join(f"{name} {value:.4f}" for name, value in tail.items()), flush=True)
    student.eval()
    training.remove()


@torch.no_grad()
def accuracy_as_compiled(folder: Path, batches: list, labels: torch.Tensor) -> float:
    """Held-out accuracy of a saved checkpoint, run as the parity oracle runs it (quantized per its sidecar)."""
    spec = load_student(folder)
    reference = load_student_module(spec)
    plan = resolve_plan(spec, read_sidecar(folder), reference.model)
    materialize(reference.model, plan)
    quantized = QuantizedLinears(reference.model, {p.module: (p.activation, p.static_scale) for p in plan.linears})
    correct = 0
    for b in batches:
        logits = reference(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0]
        correct += int((logits.argmax(-1) == labels[b["index"]]).sum())
    quantized.remove()
    return correct / len(labels)


def time_side_by_side(graphs: dict[str, Path], runs: int, vocab_size: int) -> dict[str, float]:
    """p50 ms of each graph, timed round-robin in one run (batch 1, sequence 128, 1 thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for name, path in graphs.items()}
    ids = np.random.default_rng(0).integers(5, vocab_size, size=(1, 128), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_ in range(runs + 3):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            if round_ >= 3:  # warm-up rounds
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    encoder_dir = args.model or minilm("pass --model DIR")
    spec = load_student(encoder_dir)
    require(spec.family == "sentence-transformers", f"{encoder_dir}", "a sentence-transformers BERT folder", spec.family)
    layers = parse_layers(args.teacher_layers, spec.num_layers)
    families = list(FAMILIES)
    train_docs, held_docs = split(load_corpus(args.corpus))
    train_docs, held_docs = spread(train_docs, args.max_texts), spread(held_docs, args.max_texts)
    train_labels = torch.tensor([families.index(d.family) for d in train_docs])
    held_labels = torch.tensor([families.index(d.family) for d in held_docs])
    tokenizer = load_tokenizer(spec.transformer_dir)
    train_batches = length_batches(tokenizer, [d.text for d in train_docs], args.batch_size, args.max_length)
    held_batches = length_batches(tokenizer, [d.text for d in held_docs], args.batch_size, args.max_length)
    args.out.mkdir(parents=True, exist_ok=True)
    binary_embeddings = not args.fp32_embeddings

    t = phase(f"teacher: {spec.num_layers}-layer encoder + head trained {args.head_epochs} epochs on {len(train_docs)} texts, {len(families)} classes")
    teacher = make_teacher(spec.transformer_dir, families)
    train_head(teacher, train_batches, train_labels, args.head_epochs, args.seed)
    teacher_dir = args.out / "teacher"
    if teacher_dir.exists():
        shutil.rmtree(teacher_dir)
    teacher.save_pretrained(str(teacher_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(teacher_dir))
    done(t)

    student = make_student(teacher, layers)
    untrained_dir = save_student(student, teacher_dir, args.out / "student_binarized_untrained", binary_embeddings)
    t = phase(f"student: teacher layers {layers}, W1A8{' + 1-bit word embeddings' if binary_embeddings else ''}; "
              f"{args.schedule}, {args.steps} steps (hidden, attention, logit losses)")
    train_student(student, teacher, train_batches, layers, args)
    student_dir = save_student(student, teacher_dir, args.out / "student", binary_embeddings)
    done(t)

    phase(f"held-out accuracy ({len(held_docs)} texts), each checkpoint run as edgecompile's parity oracle runs it")
    majority = float((held_labels == torch.mode(train_labels).values).float().mean())
    results = {f"teacher (fp32, {spec.num_layers} layers)": accuracy_as_compiled(teacher_dir, held_batches, held_labels),
               f"student W1A8, {len(layers)} layers, {args.schedule} distillation": accuracy_as_compiled(student_dir, held_batches, held_labels),
               "same student binarized without training": accuracy_as_compiled(untrained_dir, held_batches, held_labels)}
    print("| model | held-out accuracy |\n|---|---:|")
    for name, value in results.items():
        print(f"| {name} | {value:.3f} |")
    print(f"| (majority class) | {majority:.3f} |")

    phase("compiling teacher and student with edgecompile build")
    samples = [held_docs[i].text for i in np.linspace(0, len(held_docs) - 1, min(24, len(held_docs))).astype(int)]
    bundles = {}
    for name, folder, count in (("teacher", teacher_dir, spec.num_layers), ("student", student_dir, len(layers))):
        masks = write_trivial_masks(args.out / f"{name}_masks.safetensors", count, spec.embedding_dim)
        bundles[name] = build_bundle(folder, masks, encoder_dir, args.out / f"{name}_bundle", samples)
    manifests = {name: json.loads((path / "manifest.json").read_text()) for name, path in bundles.items()}
    size = {name: m["dense"]["bytes"]["cpu"] for name, m in manifests.items()}
    p50 = time_side_by_side({name: path / "cpu" / "dense.onnx" for name, path in bundles.items()}, args.bench_runs,
                            manifests["student"]["student"]["vocab_size"])
    print("\n| graph | bytes on disk | p50 ms (batch 1, sequence 128, 1 thread) |\n|---|---:|---:|")
    for name in bundles:
        print(f"| {name} | {size[name] / 1e6:.2f} MB | {p50[name]:.2f} |")
    print(f"student vs fp32 teacher: {size['teacher'] / size['student']:.1f}x smaller, {p50['teacher'] / p50['student']:.2f}x faster "
          f"({args.bench_runs} round-robin runs; {cpu_flags()})")
    finished(started)


if __name__ == "__main__":
    run_recipe(main)
