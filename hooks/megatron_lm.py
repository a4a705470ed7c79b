"""The Megatron-LM `pretrain()` hook (Megatron-LM has no callback API).

Add two lines to pretrain_gpt.py, before `pretrain(...)` in `if __name__ == "__main__":`

    from fineline_monitor.integrations.megatron_lm import install as fineline_install
    fineline_install(config="fineline.yaml")   # optional: tokenizer=..., sinks=..., checkpoint_fn=...

It wraps `megatron.training.training.train_step` (to see the model and optimizer) and
`training_log` (to call `monitor.step` once per iteration on every rank). Details, the
exact functions and signatures it relies on: fineline_monitor/integrations/megatron_lm.py
and the README (Adding the monitor to a training script). This file re-exports the hook so a Megatron-LM checkout can
also use it by path (`sys.path.insert(0, "<fineline repo>/hooks")`).
"""

from fineline_monitor.integrations.megatron_lm import MegatronLMHook, install  # noqa: F401

__all__ = ["install", "MegatronLMHook"]
