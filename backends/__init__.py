"""Lowering and runtimes (imported as ``qcompiler.backends``): onnx_qdq and ort."""
