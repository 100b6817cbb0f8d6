"""Built-in backends.  Importing this package registers them; engines import lazily."""

import importlib

for _name in ("local", "mpi", "torch_dist"):
    try:  # DEVTEMP: remove guard once all backends exist
        importlib.import_module(f"collectives.backends.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"collectives.backends.{_name}":
            raise
