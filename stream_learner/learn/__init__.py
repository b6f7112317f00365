"""Models, featurizer and the online learner (no Kafka here; the trainer role wires it)."""
