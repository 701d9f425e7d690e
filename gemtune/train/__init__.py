"""Training: LoRA presets, prompt-masked collation, supervised-only loss, accelerate trainer, GPU memory plan."""
