"""Model facts: GGUF and Hugging Face configs read into a ModelSpec, quantization levels, KV types, units."""
