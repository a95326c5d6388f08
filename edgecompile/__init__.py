"""edgecompile: compile compressed transformer students into verified ONNX bundles."""

__version__ = "0.1.0"
