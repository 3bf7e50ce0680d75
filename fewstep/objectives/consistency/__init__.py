"""Consistency distillation: ``lcm`` (LCM / LCM-LoRA), ``pcm`` (PCM trajectory segments and Hyper-SD's curriculum,
adversarial term and one-step enhancement in ``hyper_sd``), ``scm`` and ``rcm`` (continuous-time consistency with a
JVP; TrigFlow math in ``trigflow``) and ``tbcm`` (sCM on cached teacher trajectories)."""
