"""Looking inside a model: attention, embeddings, copy probes (`align inspect`)."""
