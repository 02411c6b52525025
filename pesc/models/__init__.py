"""Model and tokenizer loading: Hub ids and local paths through the same code."""

from pesc.models.loading import load_model, load_tokenizer, save_model  # noqa: F401
