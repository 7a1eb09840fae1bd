"""scaletrain-lion: an example scaletrain plugin adding the Lion optimizer (`optim=lion`) and sliding-window
attention (`model/attention=sliding_window`).

Importing the package defines both config schemas (schemas.py), which is how scaletrain registers them; the
YAML options under `conf/` join Hydra's search path through the `scaletrain.plugins` entry point.
"""

from scaletrain_lion import attention, lion, schemas

__all__ = ["attention", "lion", "schemas"]
__version__ = "0.1.0"
