"""scaletrain: a Hydra-configured ablation platform for LLM pre-training in PyTorch."""

__version__ = "0.1.0"
