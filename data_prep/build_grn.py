#!/usr/bin/env python
"""Build the GRN assets of a store: `python data_prep/build_grn.py --store STORE --demo` (see --help)."""
import sys

from grnformer_ds.grn.cli import main

if __name__ == "__main__":
    sys.exit(main())
