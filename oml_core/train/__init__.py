"""Fine-tuning fingerprints into a model: examples, benign mixing, trainer, regularizer."""
