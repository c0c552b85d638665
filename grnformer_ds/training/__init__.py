"""Training with DeepSpeed, pretraining and fine-tuning alike (what differs per task is in `grnformer_ds.tasks`): run
settings, DeepSpeed config resolution, engine, LR schedule, guards, checkpoints, MLflow tracking, the training loop
and the Hugging Face export.

Modules (import them directly; this package imports nothing heavy so that `--help` and config errors stay fast):
    settings     RunSettings / BatchSettings / OptimSettings (typed run settings)
    ds_config    load_ds_config, resolve_ds_config (one source of truth for batch, accumulation, clipping, precision)
    engine       the only module that imports deepspeed: init_distributed, build_engine, zero.Init, consolidation
    schedule     warmup + cosine LambdaLR
    guards       NaN/Inf loss guard, finite-weights check, out-of-memory hints
    checkpoint   DeepSpeed checkpoints + loader/RNG state + atomic "latest"
    tracking     MLflow on rank 0
    throughput   cells/s, tokens/s, MFU
    trainer      the training loop (accumulation, evaluation, logging, checkpoints, resume, early stopping)
    early_stopping  the validation-metric rule and the best checkpoint (fine-tuning)
    integration  store / demo store / model / dataset glue
    export       ZeRO checkpoint (any world size) -> save_pretrained folder
    cli          the launchers' shared command-line options
    run          run_task(args, task): run_pretraining (launchers/pretrain.py), run_finetuning (launchers/finetune.py)
"""
