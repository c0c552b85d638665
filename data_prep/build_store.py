#!/usr/bin/env python
"""Convert .h5ad files into a grnformer_ds store. `python data_prep/build_store.py --help` for options."""
import sys

# anndata imports dask when it is installed (~0.4 s per process: this one and each spawned worker, which re-runs this
# file); no part of a store build uses dask, so this command runs as if it were not installed.
if "dask" not in sys.modules:
    sys.modules["dask"] = None

from grnformer_ds.store.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
