"""fedpft-dist: distributed FedPFT (federated proxy fine-tuning of foundation models)."""
__version__ = "0.1.0"
