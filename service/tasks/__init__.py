"""Application endpoints built on the engine: customer service, content generation and translation.

Pure parts (BM25 retrieval, intent calibration, guard, sentence splitting, language detection, history
truncation) import only numpy and the torch-free parts of `model/`, so they work in the CPU serving image.
"""
