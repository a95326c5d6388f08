"""onnxruntime-genai on a decoder folder, loaded and driven as an app does (one graph picked by config overlay)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecompile.errors import EnvironmentProblem, GraphLoadError, one_line


def genai_model(folder: Path, graph: str):
    """onnxruntime-genai's model for one graph of a decoder folder, loaded as an app loads it."""
    from edgecompile.bundle.layout import genai_overlay

    try:
        import onnxruntime_genai as og
    except ImportError:
        raise EnvironmentProblem("onnxruntime-genai is needed to check decoder bundles; install it with: "
                                 "pip install onnxruntime-genai") from None
    try:
        config = og.Config(str(folder))
        config.overlay(genai_overlay(graph))
        return og.Model(config)
    except Exception as exc:  # onnxruntime-genai raises RuntimeError for a folder or graph it cannot load
        raise GraphLoadError(f"{folder}: onnxruntime-genai could not load {graph}.onnx ({one_line(exc)})") from None


def genai_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """onnxruntime-genai's generator, greedy, on token ids."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False, min_length=0)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], np.int32))
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
