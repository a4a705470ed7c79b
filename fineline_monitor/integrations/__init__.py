"""Framework adapters, one module per framework; each imports its framework lazily.

- `deepspeed.DeepSpeedMonitor`: a DeepSpeed engine (ZeRO 0-3, pipeline engine).
- `megatron.MegatronMonitor`: megatron-core models (TP, PP via the forward-only schedule).
- `megatron_lm.install`: the Megatron-LM `pretrain()` hook (wraps train_step/training_log).
- `hf_trainer.FineLineCallback`: a Hugging Face `TrainerCallback`.
- `lightning.FineLineLightningCallback`: a Lightning `Callback`.
- `megatron_cpu_patches`: megatron-core on the CPU, for tests and `--cpu-patches` only.

See the README (Adding the monitor to a training script) for the lines to add to a training script.
"""
