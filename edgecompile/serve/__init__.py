"""Running a bundle as an app would: onnxruntime sessions per target, `run`, `bench`."""
