#!/usr/bin/env python
"""Convert .h5ad files into a grnformer_ds store. `python data_prep/build_store.py --help` for options."""
import sys

from grnformer_ds.store.cli import main

if __name__ == "__main__":
    sys.exit(main())
