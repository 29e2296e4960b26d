"""Teachers: made elsewhere (`foreign`), and the cache of a teacher's logits."""
