"""Model and tokenizer loading: Hub ids and local paths through the same code."""

from pesc.models.loading import load_model, load_tokenizer, require_shared_vocab, save_model  # noqa: F401
