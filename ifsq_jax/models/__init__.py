"""Models: the tokenizer (Linen), and loading a trained one."""
