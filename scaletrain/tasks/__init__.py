"""scaletrain's own lm-eval task configs (local_*: data from local files) and their loaders; harness.py adds
this folder to the harness's task search path."""
