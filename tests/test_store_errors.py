"""Bad input → one-line `error: <file>: <problem>` on stderr, exit 2, and no store marked complete."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from store_fixtures import make_counts, write_h5ad  # noqa: E402

from grnformer_ds.errors import UserInputError  # noqa: E402
from grnformer_ds.store import open_store  # noqa: E402
from grnformer_ds.store.cli import main  # noqa: E402
from grnformer_ds.store.manifest import read_manifest, update_manifest_assets, write_manifest  # noqa: E402

GENES = [f"G{i}" for i in range(12)]

# anndata/zarr warn on every open that consolidated metadata is not in the zarr v3 spec yet
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main([*map(str, argv), "--quiet"])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc, err, *needles):
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


@pytest.fixture
def good(tmp_path):
    return write_h5ad(tmp_path / "good.h5ad", make_counts(40, 12, 0), GENES)


def _bad_counts(tmp_path, name, value, row=7):
    X = make_counts(40, 12, 1)
    X[row, 3] = value
    return write_h5ad(tmp_path / name, X, GENES)


@pytest.mark.parametrize("name,value,needle", [
    ("neg.h5ad", -1.0, "negative counts (first at row 7)"),
    ("nan.h5ad", np.nan, "NaN or infinite"),
    ("frac.h5ad", 0.5, "non-integer values (first at row 7"),
])
def test_bad_count_values(tmp_path, capsys, good, name, value, needle):
    bad = _bad_counts(tmp_path, name, value)
    out = tmp_path / "store"
    rc, err = run_cli(capsys, "--out", out, good, bad)
    assert_one_line_error(rc, err, str(bad), needle)
    assert not (out / "manifest.json").exists()


def test_allow_non_integer_opt_out(tmp_path, capsys):
    X = make_counts(40, 12, 1) * 0.5
    f = write_h5ad(tmp_path / "norm.h5ad", X, GENES)
    rc, err = run_cli(capsys, "--out", tmp_path / "s", "--allow-non-integer", f)
    assert rc == 0, err
    st = open_store(tmp_path / "s")
    assert st.manifest["integer_counts"] is False
    assert st.read_shard(0).X.sum() == pytest.approx(X.sum())


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_gene_names_and_ids(tmp_path, capsys):
    X = make_counts(10, 4, 2)
    f = write_h5ad(tmp_path / "dup.h5ad", X, ["A", "B", "A", "C"])
    rc, err = run_cli(capsys, "--out", tmp_path / "s", f)
    assert_one_line_error(rc, err, str(f), "duplicate gene names", "A")
    f2 = write_h5ad(tmp_path / "dupid.h5ad", X, ["A", "B", "C", "D"],
                    gene_ids=["ENSG00000000001.1", "ENSG00000000002", "ENSG00000000001.2", "ENSG00000000003"])
    rc, err = run_cli(capsys, "--out", tmp_path / "s2", "--gene-id-column", "gene_ids", f2)
    assert_one_line_error(rc, err, str(f2), "duplicate gene ids", "ENSG00000000001")
    rc, err = run_cli(capsys, "--out", tmp_path / "s3", "--gene-id-column", "ensembl", f2)
    assert_one_line_error(rc, err, str(f2), "no column 'ensembl'")


def test_vocab_without_overlap_and_low_mapping(tmp_path, capsys, good):
    v = tmp_path / "vocab.json"
    v.write_text(json.dumps({"<pad>": 0, "XIST": 1, "ACTB": 2}))
    rc, err = run_cli(capsys, "--out", tmp_path / "s", "--gene-vocab", v, good)
    assert_one_line_error(rc, err, str(good), "no gene of this input is in the given vocabulary")
    v.write_text(json.dumps({"G0": 0, "G1": 1}))  # ~1/6 of the counts
    rc, err = run_cli(capsys, "--out", tmp_path / "s2", "--gene-vocab", v, good)
    assert_one_line_error(rc, err, str(good), "below --min-mapped-fraction 0.5")
    assert not (tmp_path / "s2" / "manifest.json").exists()
    rc, err = run_cli(capsys, "--out", tmp_path / "s2", "--gene-vocab", v, "--min-mapped-fraction", "0.1",
                      "--overwrite", good)
    assert rc == 0, err
    v.write_text("{not json")
    rc, err = run_cli(capsys, "--out", tmp_path / "s3", "--gene-vocab", v, good)
    assert_one_line_error(rc, err, str(v), "invalid JSON at line 1 column 2 of the vocabulary")


def test_missing_cell_type_key(tmp_path, capsys, good):
    rc, err = run_cli(capsys, "--out", tmp_path / "s", "--cell-type-key", "celltype", good)
    assert_one_line_error(rc, err, str(good), "no column 'celltype' (--cell-type-key)")


def test_unreadable_and_truncated_files(tmp_path, capsys, good):
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"not an hdf5 file at all")
    rc, err = run_cli(capsys, "--out", tmp_path / "s", good, junk)
    assert_one_line_error(rc, err, str(junk), "unreadable or truncated")
    big = write_h5ad(tmp_path / "big.h5ad", make_counts(3000, 12, 3), GENES)
    trunc = tmp_path / "trunc.h5ad"
    trunc.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    rc, err = run_cli(capsys, "--out", tmp_path / "s2", trunc)
    assert_one_line_error(rc, err, str(trunc), "unreadable or truncated")
    rc, err = run_cli(capsys, "--out", tmp_path / "s3", tmp_path / "missing.h5ad")
    assert_one_line_error(rc, err, "missing.h5ad", "not found")


def test_existing_store_needs_overwrite(tmp_path, capsys, good):
    out = tmp_path / "s"
    assert run_cli(capsys, "--out", out, good)[0] == 0
    before = (out / "manifest.json").read_text()
    rc, err = run_cli(capsys, "--out", out, good)
    assert_one_line_error(rc, err, str(out), "already holds a store", "--overwrite")
    assert (out / "manifest.json").read_text() == before
    other = write_h5ad(tmp_path / "other.h5ad", make_counts(25, 12, 5), GENES, cell_prefix="o")
    assert run_cli(capsys, "--out", out, "--overwrite", other)[0] == 0
    assert open_store(out).n_cells == 25
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    rc, err = run_cli(capsys, "--out", foreign, good)
    assert_one_line_error(rc, err, "not empty")
    assert (foreign / "keep.txt").exists()


def test_zero_count_cells_are_dropped_and_counted(tmp_path, capsys):
    f = write_h5ad(tmp_path / "z.h5ad", make_counts(30, 12, 4, zero_rows=(0, 3, 29)), GENES)
    rc, err = run_cli(capsys, "--out", tmp_path / "s", f)
    assert rc == 0
    m = open_store(tmp_path / "s").manifest
    assert m["n_cells"] == 27 and m["n_zero_cells_dropped"] == 3


def test_open_store_refuses_missing_incomplete_and_other_schema(tmp_path, capsys, good):
    with pytest.raises(UserInputError, match="store directory not found"):
        open_store(tmp_path / "nope")
    out = tmp_path / "s"
    assert run_cli(capsys, "--out", out, good)[0] == 0
    m = read_manifest(out)
    for broken, needle in (({**m, "schema_version": 99}, "schema_version 99 is not supported"),
                           ({**m, "complete": False}, "marked incomplete"),
                           ({k: v for k, v in m.items() if k != "shards"}, "missing shards")):
        write_manifest(out, broken)
        with pytest.raises(UserInputError, match=needle):
            open_store(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(UserInputError, match="manifest.json: invalid JSON at line 1 column 2 of the manifest"):
        open_store(out)
    (out / "manifest.json").unlink()
    with pytest.raises(UserInputError, match="no manifest.json"):
        open_store(out)
    write_manifest(out, m)
    update_manifest_assets(out, "grn", {"schema_version": 1, "path": "grn"})
    assert open_store(out).assets == {"grn": {"schema_version": 1, "path": "grn"}}


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_cli_subprocess_exit_code_and_no_traceback(tmp_path, good):
    script = Path(__file__).parents[1] / "data_prep" / "build_store.py"
    r = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "s"), "--cell-type-key", "nope",
                        str(good)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {good}: obs has no column 'nope' (--cell-type-key)"
