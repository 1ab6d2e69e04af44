"""SpecKV inside other libraries' decoding loops (`hf`: Hugging Face `generate`)."""
