"""The device runtime: numpy + onnxruntime (+ Pillow for images). Never torch, never onnx."""
