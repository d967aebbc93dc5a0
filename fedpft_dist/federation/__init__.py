"""Federated fine-tuning: sampling, client training, aggregation, the round loop."""
