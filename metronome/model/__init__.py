"""The model as data: GGUF / HF folders read into weights + `ModelConfig`, the tokenizer, and the pure torch network."""
