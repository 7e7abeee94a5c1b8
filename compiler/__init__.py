"""ONNX -> vitamin program compiler."""
