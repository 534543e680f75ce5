"""Checkpoint -> ONNX bundle (served graph, optimum-layout graph, int8) and GGUF; the torch-free bundle runner.

Nothing heavy here: `export.runtime` must import without torch (the CPU serving image has none).
"""
