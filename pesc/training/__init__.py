"""Training: teacher fine-tuning and distillation on transformers.Trainer, configs and the pipeline."""
