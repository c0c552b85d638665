"""grnformer_ds: DeepSpeed pretraining of single-cell foundation models with gene regulatory networks."""
from setuptools import find_packages, setup

# torch is pinned by the installer (README / .ci/run) before this runs: on CPU-only machines an unpinned
# `torch` pulled in by deepspeed or torch-geometric resolves to a multi-GB CUDA build.
# Lower bounds of transformers, deepspeed, torch-geometric, tensorstore: the whole test suite passed with all four at
# these versions together (docs/install.md#supported-versions).
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy>=1.26",
    "scipy>=1.11",
    "pandas>=2.1",
    "h5py>=3.10",
    "anndata>=0.12.5",  # ad.settings auto_shard_zarr_v3
    "zarr>=3.1",
    "numcodecs>=0.15",
    "tensorstore>=0.1.62",  # older wheels are built against numpy 1.x
    "scanpy>=1.10",  # ships the pbmc68k_reduced / krumsiek11 demo data
    "scikit-learn>=1.4",
    "transformers>=5.23",  # transformers.initialization, initialize_weights_zero3, activation_checkpointing_enable
    "safetensors>=0.4",
    "torch-geometric>=2.5",  # GATConv without a tied lin_src/lin_dst (save_pretrained refuses shared tensors)
    "deepspeed>=0.16.6",  # DeepSpeedEngine.is_deepcompile_enabled
    "mlflow>=3.0",
    "tqdm>=4.66",
    "numba>=0.59",  # fused scatter kernels of the store builder
    "priori-regulon-enrichment>=1.0.8",  # ships a human TF-target prior (demo GRN, no download)
]

EXTRAS = {
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "pytest-xdist>=3.5",  # the fast loop: pytest -m "not e2e" -n auto
        "ruff>=0.6",  # lint: `ruff check .` (pyproject.toml)
        "ctxcore>=0.2",   # AUCell reference
        "setuptools<81",  # ctxcore imports pkg_resources
        "pyscenic>=0.12",  # AUCell reference (rankings)
        "rdkit>=2024.3",  # the drug-response task's tests
    ],
    "drug": ["rdkit>=2024.3"],  # fine-tuning --task drug-response: Morgan fingerprints from SMILES
    "bench": ["bionemo-scdl>=0.1", "psutil>=5.9", "tiledbsoma-ml>=0.1"],
    "flash": ["flash-attn>=2.6"],
    "grnboost": ["arboreto>=0.1.6", "dask", "distributed"],
}

setup(
    name="grnformer_ds",
    version="0.1.0",
    description="GRNFormer: DeepSpeed pretraining of single-cell RNA foundation models with multi-scale GRNs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["grnformer_ds", "grnformer_ds.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    include_package_data=True,
)
