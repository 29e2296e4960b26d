"""Teachers: the teacher stage and where a teacher is found (`stage`), teachers made elsewhere (`foreign`), and the
cache of a teacher's logits."""
