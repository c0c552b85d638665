"""CPU time of the graph stage per part, numba kernels vs the numpy reference, in one process.

    OMP_NUM_THREADS=1 python launchers/benchmarks/bench_graphs.py STORE [--batches 60] [--batch-size 64]

Batches are tokenized first (not timed); then every part runs over all batches, best of ``--repeat`` passes of
``time.process_time`` (CPU time: the machine may be shared), reported in microseconds per cell. Parts:

* reference (``graphs_reference`` / ``perturb_reference``): slot table, cell-type restriction, regulon union,
  perturbation, PyG layout, and the whole ``build_graphs`` with perturbation on / off;
* numba (``graph_kernels``, ``perturb``): ``celltype_graph`` (writes PyG layout itself), ``cell_union``,
  ``perturb_cells`` (on a copy of the union, the copy's own cost printed beside it), ``to_pyg`` of the cell graph, and
  the whole ``GraphBuilder`` with perturbation on / off.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=1200)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    from grnformer_ds.data import StreamingCellDataset
    from grnformer_ds.data import graph_kernels as K
    from grnformer_ds.data import graphs_reference as R
    from grnformer_ds.data.perturb_reference import perturb_edges as ref_perturb

    ds = StreamingCellDataset(args.store, batch_size=args.batch_size, seed=0, eval_fraction=0.0,
                              edge_perturbation=0.2, max_seq_len=args.max_seq_len)
    plan = ds.plan()
    gb, a = ds.graph_builder, ds.graph_builder.assets
    batches = []
    for step in range(args.batches):
        rows = ds._rows(plan, plan.step_cells(step))
        _, slot_genes = ds.collator(rows, np.random.default_rng(step))
        table = R.slot_table(slot_genes, a.n_genes)
        active = np.unpackbits(rows.active_regulons, axis=1, count=a.n_regulons, bitorder="little").astype(bool)
        union = R.cell_specific_edges(a, active, table, slot_genes.shape[1])
        pert = ref_perturb(*union, table, slot_genes, a.coexpr_indptr, a.coexpr_indices, a.coexpr_data, 0.2,
                           np.random.default_rng(step))
        batches.append(dict(sg=slot_genes, ct=rows.cell_type, bits=rows.active_regulons, table=table,
                            active=active, union=union, pert=pert, ct_edges=R.celltype_edges(a, rows.cell_type, table)))
    n_cells = sum(len(b["ct"]) for b in batches)
    co = (a.coexpr_indptr, a.coexpr_indices, a.coexpr_data)

    def us_per_cell(fn):
        fn(0, batches[0])  # numba compile / cache load, first-touch
        best = np.inf
        for _ in range(args.repeat):
            t = time.process_time()
            for i, b in enumerate(batches):
                fn(i, b)
            best = min(best, time.process_time() - t)
        return 1e6 * best / n_cells

    rng = np.random.default_rng
    L = batches[0]["sg"].shape[1]
    ref = {
        "slot_table": lambda i, b: R.slot_table(b["sg"], a.n_genes),
        "celltype_edges": lambda i, b: R.celltype_edges(a, b["ct"], b["table"]),
        "cell_specific_edges": lambda i, b: R.cell_specific_edges(
            a, np.unpackbits(b["bits"], axis=1, count=a.n_regulons, bitorder="little").astype(bool), b["table"], L),
        "perturb_edges": lambda i, b: ref_perturb(*b["union"], b["table"], b["sg"], *co, 0.2, rng(i)),
        "_to_pyg (both graphs)": lambda i, b: (R._to_pyg(b["ct_edges"], L), R._to_pyg(b["pert"], L)),
        "TOTAL perturb on": lambda i, b: R.build_graphs(a, b["sg"], b["ct"], b["bits"], 0.2, rng(i), True),
        "TOTAL perturb off": lambda i, b: R.build_graphs(a, b["sg"], b["ct"], b["bits"], 0.2, rng(i), False),
    }
    from grnformer_ds.data.perturb import perturb_cells

    ct_args, reg_args = gb._celltype, gb._regulons

    def union(b):
        return K.cell_union(b["sg"], b["bits"], *reg_args, a.n_genes)

    for b in batches:
        b["new_union"] = union(b)

    def perturb(i, b):  # on a copy: perturb_cells edits in place
        ptr, s, d, w = b["new_union"]
        perturb_cells(ptr, s.copy(), d.copy(), w.copy(), b["sg"], *gb._coexpr, 0.2, np.uint64(i))

    new = {
        "celltype_graph (restrict+PyG)": lambda i, b: K.celltype_graph(b["sg"], b["ct"], *ct_args, a.n_genes),
        "cell_union": lambda i, b: union(b),
        "copy of the union (not in TOTAL)": lambda i, b: [x.copy() for x in b["new_union"][1:]],
        "perturb_cells (incl. copy)": perturb,
        "to_pyg (cell graph)": lambda i, b: K.to_pyg(b["new_union"][0], b["new_union"][1], b["new_union"][2], L),
        "TOTAL perturb on": lambda i, b: gb(b["sg"], b["ct"], b["bits"], rng(i), True),
        "TOTAL perturb off": lambda i, b: gb(b["sg"], b["ct"], b["bits"], rng(i), False),
    }
    print(f"{n_cells} cells, {args.batches} batches x {args.batch_size}, L={L}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print("reference (numpy), us/cell:")
    res_ref = {k: us_per_cell(f) for k, f in ref.items()}
    for k, v in res_ref.items():
        print(f"  {k:32s} {v:8.1f}")
    print("numba kernels, us/cell:")
    res_new = {k: us_per_cell(f) for k, f in new.items()}
    for k, v in res_new.items():
        print(f"  {k:32s} {v:8.1f}")
    print(f"speed-up, perturb on: {res_ref['TOTAL perturb on'] / res_new['TOTAL perturb on']:.1f}x; "
          f"off: {res_ref['TOTAL perturb off'] / res_new['TOTAL perturb off']:.1f}x")


if __name__ == "__main__":
    main()
