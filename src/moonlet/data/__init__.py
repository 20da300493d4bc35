"""Data: the bundled corpus and user files (corpus), the tokenizer, packed batches (loader) and the
synthetic verifiable tasks (tasks). Nothing here imports the model."""
