"""scaletrain's Hydra config tree (pkg://scaletrain.conf); see scaletrain/compose.py."""
