"""The ground floor every layer stands on: the error root, hashing, atomic files, the one safe ONNX
loader, tensor specs, and the doors to CUDA and TensorRT.

Nothing here imports ``calibrators``, ``engines`` or ``service``; ``core.errors`` imports nothing
heavy, so the thin HTTP client can take it.
"""
