"""talr.sft -- torch + transformers: losses, trainer, models, data, evaluation."""
