"""The embedded default: a tiny text-to-image model, its tokenizer and rewards, shipped with the package."""
