"""Running graphs: sessions on a target's execution provider, decode loops, onnxruntime-genai; what check/ and serve/ stand on."""
