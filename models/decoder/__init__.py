"""Language decoders: take embeddings ``B,T,D`` and return logits plus auxiliary losses."""
