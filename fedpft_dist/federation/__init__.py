"""Federated fine-tuning: methods and aggregators by name, sampling, client training, evaluation,
the round state and its checkpoints, and the round loop (:mod:`.engine`)."""
