#!/usr/bin/env python
"""Check flash-attn against SDPA (and the eager reference) on a GPU: outputs, gradients and speed.

Two parts, each for every available implementation in --impls:
1. kernel: GRNFormer's attention dispatch on random padded q/k/v (varlen unpadding for flash-attn), forward output
   and q/k/v gradients compared with an fp32 eager reference on real positions; forward+backward time.
2. model: GRNFormerForMaskedLM (one weight set, switched with `set_attn_implementation`) on a dummy batch with
   graphs, per backbone: loss / predictions / cell embeddings compared with SDPA in eval mode; train-mode
   forward+backward step time, cells/s and peak memory.

Prints a markdown table and writes JSON to --json (default $OUT/gpu_attention_check.json when $OUT is set).
Exit status 1 when a parity check fails, or when --require-flash is given and flash-attn cannot run.

    python launchers/benchmarks/gpu_attention_check.py                       # H100 defaults
    python launchers/benchmarks/gpu_attention_check.py --device cpu --small  # smoke run without a GPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone

import torch

from grnformer_ds.modeling import GRNFormerConfig, GRNFormerForMaskedLM, make_dummy_batch
from grnformer_ds.modeling.attention import eager_attention, flash_attention, sdpa_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--impls", default="flash_attention_2,sdpa,eager")
    p.add_argument("--backbones", default="scgpt,scfoundation")
    p.add_argument("--preset", default="scgpt-base")
    p.add_argument("--batch-size", type=int, default=16, help="scgpt cells per batch")
    p.add_argument("--seq-len", type=int, default=1200, help="scgpt tokens per cell (scGPT pretraining: 1200)")
    p.add_argument("--sf-batch-size", type=int, default=4, help="scfoundation cells per batch")
    p.add_argument("--sf-seq-len", type=int, default=2048, help="scfoundation encoder tokens (nonzero genes)")
    p.add_argument("--sf-genes", type=int, default=19264, help="scfoundation decoder genes (scFoundation: 19264)")
    p.add_argument("--edges-per-cell", type=int, default=2000)
    p.add_argument("--kernel-batch", type=int, default=16)
    p.add_argument("--kernel-len", type=int, default=2048)
    p.add_argument("--kernel-heads", type=int, default=8)
    p.add_argument("--kernel-head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--small", action="store_true", help="tiny sizes (debug preset) for a CPU smoke run")
    p.add_argument("--require-flash", action="store_true", help="fail when flash-attn cannot run")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.small:
        args.preset, args.batch_size, args.seq_len = "debug", 4, 64
        args.sf_batch_size, args.sf_seq_len, args.sf_genes = 2, 48, 256
        args.edges_per_cell, args.kernel_batch, args.kernel_len = 64, 4, 128
        args.kernel_heads, args.kernel_head_dim, args.warmup, args.steps = 2, 16, 1, 2
    return args


def flash_status(device: str) -> tuple[bool, str]:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        import flash_attn

        return True, f"flash_attn {flash_attn.__version__}"
    except Exception as exc:  # ImportError, or an ABI mismatch raised as OSError/RuntimeError
        return False, f"flash_attn not importable: {exc}"


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, warmup, steps, device):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def random_lengths(gen, n, max_len, low_fraction=0.25):
    low = max(3, int(max_len * low_fraction))
    lengths = torch.randint(low, max_len + 1, (n,), generator=gen).tolist()
    lengths[0] = max_len  # one full row, so max_seqlen is exercised
    return lengths


def max_err(a, b, mask):
    return float((a.detach().float() - b.detach().float())[mask].abs().max())


def kernel_check(args, impls, dtype):
    device = args.device
    gen = torch.Generator().manual_seed(args.seed)
    B, L, h, d = args.kernel_batch, args.kernel_len, args.kernel_heads, args.kernel_head_dim
    lengths = random_lengths(gen, B, L)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    mask = mask.to(device)
    base = [torch.randn(B, L, h, d, generator=gen).to(device) for _ in range(3)]
    grad_out = torch.randn(B, L, h, d, generator=gen).to(device)
    scale = 1.0 / math.sqrt(d)

    def run(impl, tensors):
        q, k, v = tensors
        if impl == "eager":
            return eager_attention(q, k, v, mask, 0.0, scale)[0]
        if impl == "sdpa":
            return sdpa_attention(q, k, v, mask, 0.0, scale)
        return flash_attention(q, k, v, mask, mask, 0.0, scale)

    # fp32 eager reference
    ref_in = [t.clone().requires_grad_(True) for t in base]
    ref_out = run("eager", ref_in)
    ref_out.backward(grad_out.masked_fill(~mask[..., None, None], 0))
    results = {"shape": [B, L, h, d], "dtype": str(dtype), "mean_len": sum(lengths) / B, "impls": {}}
    for impl in impls:
        tensors = [t.to(dtype).clone().requires_grad_(True) for t in base]
        out = run(impl, tensors)
        out.backward(grad_out.to(dtype).masked_fill(~mask[..., None, None], 0))
        entry = {
            "out_max_abs_err_vs_fp32": max_err(out, ref_out, mask),
            "grad_max_abs_err_vs_fp32": max(max_err(t.grad, r.grad, mask) for t, r in zip(tensors, ref_in)),
        }

        def step():
            ts = [t.to(dtype).detach().requires_grad_(True) for t in base]
            run(impl, ts).backward(grad_out.to(dtype))

        entry["fwd_bwd_ms"] = 1000 * timed(step, args.warmup, args.steps, device)
        results["impls"][impl] = entry
    return results


def model_config(args, backbone, vocab_size):
    return GRNFormerConfig.from_preset(args.preset, backbone=backbone, vocab_size=vocab_size,
                                       hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def model_check(args, backbone, impls, dtype):
    device = args.device
    gen = torch.Generator().manual_seed(args.seed + 1)
    # scFoundation's all-gene decoder gets its own sizes (--sf-*); every other backbone the encoder's
    sizes = {"scfoundation": (args.sf_batch_size, args.sf_seq_len, args.sf_genes)}
    bsz, seqlen, n_genes = sizes.get(backbone, (args.batch_size, args.seq_len, max(4 * args.seq_len, 512)))
    cfg = model_config(args, backbone, vocab_size=n_genes + 3)
    batch = make_dummy_batch(cfg, batch_size=bsz, seq_len=seqlen, n_genes=n_genes,
                             lengths=random_lengths(gen, bsz, seqlen), edges_per_cell=args.edges_per_cell,
                             seed=args.seed, device=device)
    torch.manual_seed(args.seed)
    model = GRNFormerForMaskedLM(cfg).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    mask = batch["attention_mask"]
    # predictions aligned with the input slots are compared at real slots; an all-gene decoder's everywhere
    pred_mask = mask if batch["labels"].shape == mask.shape else torch.ones_like(batch["labels"], dtype=torch.bool)
    result = {"batch_size": bsz, "seq_len": seqlen, "n_genes": n_genes, "params": n_params,
              "mean_len": float(mask.sum(1).float().mean()), "impls": {}}
    reference_holder: dict = {}
    for impl in impls:
        try:
            result["impls"][impl] = model_impl_check(model, batch, impl, reference_holder, pred_mask, args, bsz)
        except torch.cuda.OutOfMemoryError:
            result["impls"][impl] = {"error": "OOM"}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def model_impl_check(model, batch, impl, reference_holder, pred_mask, args, bsz):
    """Eval-mode outputs compared with the first implementation run, then train-mode step timing."""
    device = args.device
    model.set_attn_implementation(impl)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    entry = {"loss": float(out.loss)}
    reference = reference_holder.get("out")
    if reference is None:
        # keep only what is compared, not the activations
        reference_holder["out"] = {"loss": out.loss, "predictions": out.predictions,
                                   "cell_embedding": out.cell_embedding}
    else:
        ref_loss = float(reference["loss"])
        entry["loss_rel_diff_vs_first"] = abs(float(out.loss) - ref_loss) / abs(ref_loss)
        entry["pred_max_abs_diff_vs_first"] = max_err(out.predictions, reference["predictions"], pred_mask)
        entry["cell_emb_max_abs_diff_vs_first"] = float(
            (out.cell_embedding.float() - reference["cell_embedding"].float()).abs().max())
    del out
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model(**batch).loss.backward()
        for p in params:
            p.grad = None

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, args.warmup, args.steps, device)
    entry.update(step_ms=1000 * sec, cells_per_s=bsz / sec)
    if device.startswith("cuda"):
        entry["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return entry


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if args.device == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU smoke run: bf16 matmuls on CPU would only measure the CPU
    requested = [s.strip() for s in args.impls.split(",") if s.strip()]
    has_flash, flash_note = flash_status(args.device)
    impls = [i for i in requested if i != "flash_attention_2" or has_flash]
    report = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available()
        else args.device,
        "torch": torch.__version__,
        "flash": flash_note,
        "dtype": str(dtype),
        "args": vars(args),
    }
    report["kernel"] = kernel_check(args, impls, dtype)
    report["model"] = {bb: model_check(args, bb, impls, dtype) for bb in args.backbones.split(",") if bb}

    # parity: in half precision flash-attn must be about as close to the fp32 reference as SDPA in the same dtype
    # (within 2x, rounding noise); without SDPA in the run, an absolute bound. Model losses within 1%.
    failures = []
    kernel = report["kernel"]["impls"]
    for impl, e in kernel.items():
        for key in ("out_max_abs_err_vs_fp32", "grad_max_abs_err_vs_fp32"):
            if dtype == torch.float32:
                bound = 1e-4
            elif "sdpa" in kernel and impl != "sdpa":
                bound = max(2 * kernel["sdpa"][key], 1e-3)
            else:
                bound = 5e-2 if key.startswith("out") else 2e-1
            if e[key] > bound:
                failures.append(f"kernel {impl}: {key} = {e[key]:.2e} > {bound:.2e}")
    for bb, r in report["model"].items():
        for impl, e in r["impls"].items():
            if "error" in e:
                continue  # OOM of one implementation is a measurement, not a parity failure
            if e.get("loss_rel_diff_vs_first", 0.0) > (1e-2 if dtype != torch.float32 else 1e-5):
                failures.append(f"model {bb} {impl}: loss differs from {next(iter(r['impls']))}")
    if args.require_flash and not has_flash:
        failures.append(f"flash_attention_2 unavailable: {flash_note}")
    report["failures"] = failures

    print(f"# GRNFormer attention check — {report['device']}, {report['dtype']}, {report['date_utc']}")
    print(f"flash: {flash_note}\n")
    k = report["kernel"]
    print(f"## kernel B×L×heads×d = {k['shape']}, mean length {k['mean_len']:.0f}")
    print("| impl | out err vs fp32 | grad err vs fp32 | fwd+bwd ms |\n|---|---|---|---|")
    for impl, e in k["impls"].items():
        print(f"| {impl} | {e['out_max_abs_err_vs_fp32']:.2e} | {e['grad_max_abs_err_vs_fp32']:.2e} | "
              f"{e['fwd_bwd_ms']:.2f} |")
    for bb, r in report["model"].items():
        print(f"\n## model {bb} ({args.preset}, {r['params'] / 1e6:.1f} M params), B={r['batch_size']}, "
              f"L={r['seq_len']} (mean {r['mean_len']:.0f}), genes={r['n_genes']}")
        print("| impl | loss | loss rel diff | pred max diff | step ms | cells/s | peak GiB |")
        print("|---|---|---|---|---|---|---|")
        for impl, e in r["impls"].items():
            if "error" in e:
                print(f"| {impl} | {e['error']} | | | | | |")
                continue
            print(f"| {impl} | {e['loss']:.4f} | {e.get('loss_rel_diff_vs_first', 0):.2e} | "
                  f"{e.get('pred_max_abs_diff_vs_first', 0):.2e} | {e['step_ms']:.1f} | "
                  f"{e['cells_per_s']:.1f} | {e.get('peak_mem_gib', float('nan')):.2f} |")
    print("\nfailures:", failures or "none")
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_attention_check.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
