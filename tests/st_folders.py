"""Sentence-transformers folders saved by the sentence-transformers library itself.

`save_with_sentence_transformers(out)` saves a tiny BERT → mean Pooling → Normalize model with the
installed library, plus `encoded.json`: that library's own `encode` of TEXTS. Run as a script it
(re)writes the checked-in folder for the installed major, so each lane also tests the other major's
layout (sentence-transformers 6 needs transformers 5; 5.x runs on the 4.57 lane):

    .venv/bin/python tests/st_folders.py          # writes tests/data/st6_folder
    .venv-tf4/bin/python tests/st_folders.py      # writes tests/data/st5_folder
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"
MAX_SEQ_LENGTH = 24  # below max_position_embeddings (128), so truncation is the folder's own
TEXTS = [
    "how do i reset my password?",
    "paris is the capital of france.",
    "ok",
    # longer than MAX_SEQ_LENGTH tokens: the embedding depends on truncating where the folder says
    "the quick brown fox jumps over the lazy dog while the old cat sleeps on the warm mat by the door "
    "and the rain keeps falling on the quiet town all night long",
]


def checked_in_folder(major: int) -> Path:
    return DATA / f"st{major}_folder"


def save_with_sentence_transformers(out: Path, *, seed: int = 11) -> Path:
    """Save with the installed sentence-transformers (the way its users save students and encoders)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from factories import make_bert
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    out = Path(out)
    base = out.parent / f"{out.name}.hf"
    make_bert(base, family="bert", pooler=False, seed=seed, hidden=16, heads=2, intermediate=32)
    transformer = Transformer(str(base))
    transformer.max_seq_length = MAX_SEQ_LENGTH
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(str(out))
    shutil.rmtree(base)
    embeddings = model.encode(TEXTS, convert_to_numpy=True, batch_size=8)
    (out / "encoded.json").write_text(json.dumps({"texts": TEXTS, "sentence_embedding": embeddings.tolist()}))
    return out


if __name__ == "__main__":
    import sentence_transformers

    major = int(sentence_transformers.__version__.split(".")[0])
    target = checked_in_folder(major)
    if target.exists():
        shutil.rmtree(target)
    save_with_sentence_transformers(target)
    (target / "README.md").unlink(missing_ok=True)  # the model card: not needed, and it dates the folder
    print(f"wrote {target} with sentence-transformers {sentence_transformers.__version__}")
