"""Drug features for the drug-response task: Morgan (ECFP-like) bit fingerprints from SMILES, computed with RDKit."""
from __future__ import annotations

import numpy as np

from grnformer_ds.errors import UserInputError

MORGAN_RADIUS = 2  # ECFP4
MORGAN_BITS = 1024


def morgan_fingerprints(smiles: list[str], radius: int = MORGAN_RADIUS,
                        n_bits: int = MORGAN_BITS) -> tuple[np.ndarray, list[int]]:
    """(fingerprints (D, n_bits) float32 0/1, indices of the SMILES RDKit could not parse: their rows are zero)."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError:
        raise UserInputError("the drug-response task needs RDKit for drug fingerprints: pip install "
                             "'grnformer_ds[drug]' (or pip install rdkit)") from None
    RDLogger.DisableLog("rdApp.*")  # a bad SMILES is reported once, by the caller
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), dtype=np.float32)
    bad = []
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(str(s)) if isinstance(s, str) and s else None
        if mol is None:
            bad.append(i)
            continue
        out[i] = generator.GetFingerprintAsNumPy(mol)
    return out, bad
