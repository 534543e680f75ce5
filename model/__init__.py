"""The shared model package: config, decoder, KV cache, checkpoints (torch), and the torch-free tokenizer,
chat format, task templates and sampling. This file imports nothing heavy so `import model.chat` works
without torch."""
