"""export: one module per output format of a trained checkpoint (packed safetensors, ONNX)."""
