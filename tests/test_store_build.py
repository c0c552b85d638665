"""Store builder: round trip against the inputs, shuffle, multi-input gene mapping, job-array and kill/rerun."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tensorstore as ts

sys.path.insert(0, str(Path(__file__).parent))
from store_fixtures import make_counts, store_rows_by_name, write_h5ad  # noqa: E402

from grnformer_ds.errors import UserInputError  # noqa: E402
from grnformer_ds.store import BuildOptions, build_store, open_store, run_stage  # noqa: E402
from grnformer_ds.store import gather as gather_mod  # noqa: E402
from grnformer_ds.store.schema import SPECIAL_TOKENS  # noqa: E402

G1 = [f"G{i}" for i in range(40)]
G2 = [f"G{i}" for i in range(20, 70)][::-1]     # overlaps G1, reversed order
G3 = [f"G{i}" for i in range(0, 70, 2)]         # every other gene

# anndata/zarr warn on every open that consolidated metadata is not in the zarr v3 spec yet
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    X1 = make_counts(300, 40, 1, zero_rows=(5, 17))
    X2 = make_counts(200, 50, 2)
    X3 = make_counts(150, 35, 3)
    files = [write_h5ad(d / "a.h5ad", X1, G1, "csr", "a", seed=1),
             write_h5ad(d / "b.h5ad", X2, G2, "csc", "b", seed=2),
             write_h5ad(d / "c.h5ad", X3, G3, "dense", "c", layer="counts", seed=3)]
    return files, [X1, X2, X3], [G1, G2, G3]


def expected_rows(Xs, gene_lists, prefixes, store_genes):
    """{cell name: (store columns sorted, counts)} computed directly from the dense inputs."""
    col = {g: j for j, g in enumerate(store_genes)}
    out = {}
    for X, genes, pre in zip(Xs, gene_lists, prefixes):
        cols = np.array([col.get(g, -1) for g in genes])
        for r in range(X.shape[0]):
            nz = np.nonzero((X[r] != 0) & (cols >= 0))[0]
            if len(nz) == 0:
                continue
            order = np.argsort(cols[nz])
            out[f"{pre}{r}"] = (cols[nz][order], X[r, nz][order])
    return out


def build(files, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 64)
    kw.setdefault("block_cells", 50)
    kw.setdefault("cell_type_key", "cell_type")
    return build_store([str(f) for f in files], out, **kw)


def assert_same_store(a, b):
    assert a.manifest["shards"] == b.manifest["shards"]
    for i in range(len(a.shards)):
        x, y = a.read_shard(i), b.read_shard(i)
        assert (x.X != y.X).nnz == 0
        assert x.obs.equals(y.obs) and x.var.equals(y.var)


@pytest.fixture(scope="module")
def ref_store(inputs, tmp_path_factory):
    files, _, _ = inputs
    return build(files[:2], tmp_path_factory.mktemp("ref") / "store")


def test_round_trip_shuffle_and_metadata(inputs, ref_store):
    files, Xs, genes = inputs
    st = ref_store
    m = st.manifest
    union = sorted(set(G1) | set(G2))
    assert st.gene_names == union
    assert st.vocab == {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, **{g: i + 3 for i, g in enumerate(union)}}
    assert st.token_ids.tolist() == [st.vocab[g] for g in union]
    # every kept cell's genes and counts equal the input after vocabulary mapping; zero-count cells dropped
    exp = expected_rows(Xs[:2], genes[:2], ["a", "b"], union)
    got = store_rows_by_name(st)
    assert set(got) == set(exp) and len(got) == 498 == m["n_cells"]
    for name, (c, v) in exp.items():
        np.testing.assert_array_equal(got[name][0], c)
        np.testing.assert_array_equal(got[name][1], v)
    assert m["n_zero_cells_dropped"] == 2 and m["inputs"][0]["n_zero_cells_dropped"] == 2
    assert m["inputs"][0]["count_fraction_mapped"] == 1.0 and m["inputs"][1]["n_genes_mapped"] == 50
    # shards tile [0, n_cells): bounded size, cell_index = global position; cells come shuffled across inputs
    sizes = [s["n_cells"] for s in m["shards"]]
    assert max(sizes) <= 64 and sum(sizes) == 498 and m["nnz"] == sum(len(v[0]) for v in exp.values())
    obs = [st.read_shard(i).obs for i in range(len(st.shards))]
    cell_index = np.concatenate([o["cell_index"].to_numpy() for o in obs])
    np.testing.assert_array_equal(cell_index, np.arange(498))
    src = np.concatenate([o["source_file"].astype(str).to_numpy() for o in obs])
    assert 0.3 < np.mean(src[:250] == "a.h5ad") < 0.9  # not input-ordered: a.h5ad cells are spread over the store
    names = np.concatenate([o.index.to_numpy() for o in obs])
    assert not np.array_equal(names, sorted(names))
    # obs columns: categories identical across shards, library size / n_genes right
    for o in obs:
        assert list(o["cell_type"].cat.categories) == m["cell_types"] == ["B", "NK", "T"]
        for name, lib, ng in zip(o.index, o["library_size"], o["n_genes"]):
            assert lib == exp[name][1].sum() and ng == len(exp[name][0])
    # cell types survive: compare with the input's column
    a_in = ad.read_h5ad(files[0])
    o0 = obs[0]
    for name in o0.index[o0["source_file"] == "a.h5ad"]:
        assert o0.loc[name, "cell_type"] == a_in.obs.loc[name, "cell_type"]


def test_shards_read_by_tensorstore_zarr3(ref_store):
    a = ref_store.read_shard(1)
    path = ref_store.shard_paths[1]
    # integer counts below 65,536: stored as uint16 (schema.py)
    for key, dtype in (("data", np.uint16), ("indices", np.int32), ("indptr", np.int64)):
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "X" / key)}}).result()
        got = arr.read().result()
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, getattr(a.X, key))
    meta = json.loads((path / "X" / "data" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"


def test_same_seed_same_store_other_seed_other_order(inputs, ref_store, tmp_path):
    files, _, _ = inputs
    other = build(files[:2], tmp_path / "s7", seed=7)
    names_ref = ref_store.read_shard(0).obs_names.tolist()
    assert other.read_shard(0).obs_names.tolist() != names_ref
    assert other.n_cells == ref_store.n_cells


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_workers_and_job_array_equal_single_job(inputs, ref_store, tmp_path):
    files, _, _ = inputs
    assert_same_store(ref_store, build(files[:2], tmp_path / "w2", workers=2))
    opts = BuildOptions(inputs=[str(f) for f in files[:2]], out=str(tmp_path / "arr"), cell_type_key="cell_type",
                        shard_size=64, block_cells=50, progress=False)
    run_stage(opts, "plan")
    for i in (2, 0, 1):
        run_stage(opts, "scatter", num_tasks=3, task_index=i)
    with pytest.raises(UserInputError, match="not gathered"):
        run_stage(opts, "finalize")
    for i in range(3):
        run_stage(opts, "gather", num_tasks=3, task_index=i)
    run_stage(opts, "finalize", verify_data=True)
    assert not (tmp_path / "arr" / "_work").exists()
    assert_same_store(ref_store, open_store(tmp_path / "arr"))


def test_gather_before_scatter_is_refused(inputs, tmp_path):
    files, _, _ = inputs
    opts = BuildOptions(inputs=[str(f) for f in files[:2]], out=str(tmp_path / "x"), shard_size=64, block_cells=50,
                        progress=False)
    run_stage(opts, "scatter", num_tasks=2, task_index=0)
    with pytest.raises(UserInputError, match="scatter stage unfinished"):
        run_stage(opts, "gather", num_tasks=2, task_index=0)


def test_killed_gather_rerun_completes_without_duplicates(inputs, ref_store, tmp_path, monkeypatch):
    files, _, _ = inputs
    out = tmp_path / "k"
    real = gather_mod.atomic_write_json
    calls = {"n": 0}

    def dies_on_third_shard(path, obj):  # the shard is renamed into place, then the job "dies" before its record
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real(path, obj)

    monkeypatch.setattr(gather_mod, "atomic_write_json", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build(files[:2], out)
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserInputError, match="no manifest.json"):
        open_store(out)
    # leftovers of a kill mid-write: a half-written tmp shard directory
    (out / "shards" / "shard-000005.zarr.tmp-999").mkdir(parents=True)
    monkeypatch.setattr(gather_mod, "atomic_write_json", real)
    assert_same_store(ref_store, build(files[:2], out))
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"shard-{i:06d}.zarr" for i in range(8)]


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_sigkill_rerun(inputs, ref_store, tmp_path):
    """A real SIGKILL of the CLI in the middle of the build, then the same command again."""
    import os
    import signal
    import subprocess
    import time

    files, _, _ = inputs
    out = tmp_path / "sk"
    args = ["--out", str(out), "--shard-size", "64", "--block-cells", "50", "--cell-type-key", "cell_type",
            "--quiet", *map(str, files[:2])]
    slow = [sys.executable, "-c",  # the CLI with a pause after each scatter unit, so the kill lands mid-build
            "import sys, time; import grnformer_ds.store.builder as b; f = b.run_scatter_unit\n"
            "def slow(*a, **k):\n r = f(*a, **k); time.sleep(0.3); return r\n"
            "b.run_scatter_unit = slow; from grnformer_ds.store.cli import main; sys.exit(main(sys.argv[1:]))", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(slow, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / "_work" / "scatter").glob("u*[0-9]")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL  # killed mid-build, not after it finished
    assert 0 < len(list((out / "_work" / "scatter").glob("u*[0-9]"))) < 10
    assert not (out / "manifest.json").exists()
    script = Path(__file__).parents[1] / "data_prep" / "build_store.py"
    assert subprocess.run([sys.executable, str(script), *args], env=env).returncode == 0
    assert_same_store(ref_store, open_store(out))


def test_three_inputs_layer_and_gene_ids(inputs, tmp_path):
    files, Xs, genes = inputs
    # layer input: counts from layers/counts (X holds log1p values)
    st = build([files[2]], tmp_path / "layer", layer="counts")
    exp = expected_rows([Xs[2]], [genes[2]], ["c"], sorted(G3))
    got = store_rows_by_name(st)
    assert set(got) == set(exp)
    for k in exp:
        np.testing.assert_array_equal(got[k][1], exp[k][1])
    # ids: versioned Ensembl ids in one input, unversioned in the other, symbols disagree
    d = tmp_path / "ids"
    d.mkdir()
    X = make_counts(30, 4, 9)
    f1 = write_h5ad(d / "v.h5ad", X, ["A", "B", "C", "D"], gene_ids=["ENSG00000000001.3", "ENSG00000000002.1",
                                                                         "ENSG00000000003.7", "ENSG00000000004.2"])
    f2 = write_h5ad(d / "u.h5ad", X[:, ::-1].copy(), ["d", "c", "b", "a"], cell_prefix="u",
                    gene_ids=["ENSG00000000004", "ENSG00000000003", "ENSG00000000002", "ENSG00000000001"])
    st = build([f1, f2], tmp_path / "ids_store", gene_id_column="gene_ids")
    assert st.gene_ids == [f"ENSG0000000000{i}" for i in range(1, 5)] and st.n_genes == 4
    got = store_rows_by_name(st)
    for r in range(30):
        if X[r].sum():
            np.testing.assert_array_equal(got[f"c{r}"][1], got[f"u{r}"][1])
            np.testing.assert_array_equal(got[f"c{r}"][0], got[f"u{r}"][0])


def test_fixed_vocab_keeps_ids_and_appends_specials(inputs, tmp_path):
    files, Xs, genes = inputs
    vocab = {"G3": 10, "G1": 4, "G0": 7, "NOTINDATA": 2, "<pad>": 0}
    vp = tmp_path / "vocab.json"
    vp.write_text(json.dumps(vocab))
    st = build([files[0]], tmp_path / "v", gene_vocab=str(vp), min_mapped_fraction=0.0)
    assert st.vocab == {**vocab, "<cls>": 11, "<eoc>": 12} and st.vocab_size == 13
    assert st.gene_names == ["NOTINDATA", "G1", "G0", "G3"]  # vocabulary id order
    got = store_rows_by_name(st)
    exp = expected_rows([Xs[0]], [genes[0]], ["a"], ["NOTINDATA", "G1", "G0", "G3"])
    assert set(got) == set(exp)  # cells with no counts in these 3 genes are dropped
    assert st.manifest["inputs"][0]["n_genes_mapped"] == 3
    frac = Xs[0][:, [0, 1, 3]].sum() / Xs[0].sum()
    assert st.manifest["inputs"][0]["count_fraction_mapped"] == pytest.approx(frac)


def test_clashing_cell_names_get_the_source_prefix_and_raw_x(tmp_path):
    X = make_counts(20, 6, 11)
    genes = [f"G{i}" for i in range(6)]
    f1 = write_h5ad(tmp_path / "one.h5ad", X, genes)  # both files name their cells c0 … c19
    f2 = write_h5ad(tmp_path / "two.h5ad", X, genes)
    st = build([f1, f2], tmp_path / "s", cell_type_key=None)
    names = set(store_rows_by_name(st))
    assert {f"one.h5ad:c{r}" for r in range(20) if X[r].sum()} <= names
    assert len(names) == st.n_cells == 2 * int((X.sum(1) > 0).sum())
    # raw.X: counts in raw, log values in X
    import anndata as ad

    a = ad.read_h5ad(f1)
    a.raw = a.copy()
    a.X = np.log1p(a.X.toarray())
    a.write_h5ad(tmp_path / "raw.h5ad")
    st = build([tmp_path / "raw.h5ad"], tmp_path / "r", use_raw=True)
    assert st.manifest["matrix"] == "raw.X" and st.read_shard(0).X.sum() == X.sum()
    with pytest.raises(UserInputError, match="no layer 'counts'"):
        build([tmp_path / "raw.h5ad"], tmp_path / "r2", layer="counts")


@pytest.mark.parametrize("special, dtype", [(None, np.uint16), (2.5, np.float32), (70000.0, np.float32)])
def test_x_data_dtype_is_store_wide(tmp_path, special, dtype):
    """Counts are stored as uint16 only when every value of every input fits exactly; one non-integer (with
    --allow-non-integer) or one count > 65,535 anywhere makes every shard float32, and the values round-trip."""
    genes = [f"G{i}" for i in range(8)]
    X1, X2 = make_counts(40, 8, 1), make_counts(40, 8, 2)
    if special is not None:
        X2[3, 5] = special
    f1, f2 = write_h5ad(tmp_path / "a.h5ad", X1, genes), write_h5ad(tmp_path / "b.h5ad", X2, genes, cell_prefix="d")
    st = build([f1, f2], tmp_path / "s", shard_size=16, block_cells=20, allow_non_integer=special == 2.5)
    assert len(st.shards) == 5
    for i in range(len(st.shards)):
        a = st.read_shard(i)
        assert a.X.dtype == dtype and a.X.indices.dtype == np.int32
    got = store_rows_by_name(st)
    for prefix, X in (("c", X1), ("d", X2)):
        for r in np.flatnonzero(X.sum(1) > 0):
            cols, vals = got[f"{prefix}{r}"]
            np.testing.assert_array_equal(cols, np.flatnonzero(X[r]))
            np.testing.assert_array_equal(vals.astype(np.float64), X[r][X[r] != 0].astype(np.float64))


@pytest.mark.e2e  # worker processes / subprocesses / DeepSpeed engine / MLflow
def test_single_array_with_barrier_equals_single_job(inputs, ref_store, tmp_path):
    """One array without --stage: each task scatters, waits for the others' scatter units, then gathers."""
    import threading

    files, _, _ = inputs
    opts = BuildOptions(inputs=[str(f) for f in files[:2]], out=str(tmp_path / "bar"), cell_type_key="cell_type",
                        shard_size=64, block_cells=50, progress=False, extra={"barrier_poll_s": 0.05})
    run_stage(opts, "plan")
    errors = []

    def task(i):
        try:
            run_stage(opts, "all", num_tasks=2, task_index=i)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    run_stage(opts, "finalize")
    assert_same_store(ref_store, open_store(tmp_path / "bar"))
