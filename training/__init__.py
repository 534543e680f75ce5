"""Training-side code: the dataset pipeline (`training.data`), tokenizer training, the train loop, evaluation."""
