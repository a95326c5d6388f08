"""Graph rewrites, one per file, each an onnx-ir pass (see onnx_ir.passes.common for the style)."""
