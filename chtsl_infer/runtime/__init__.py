"""The inference runtime: backends (dense, sparse, ONNX) and the feature-major forward and decoding."""
