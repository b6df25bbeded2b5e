"""Training with TRL: what SFT and DPO share (`trainer`: arguments, LoRA, checkpoints, resume, the training
log, gathered save, `accelerate launch`), and the completion-only LM head for CPUs (`completion_head`), which
replaces TRL's fused head only where labels count."""
