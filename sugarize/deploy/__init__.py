"""Deployment: ONNX export, runtimes (onnxruntime, OpenVINO), parity, structural identity, int8."""
