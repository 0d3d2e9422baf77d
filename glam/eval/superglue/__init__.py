"""SuperGLUE evaluation (`glam eval superglue`): tasks.py (registry), readers.py (JSONL / TFDS),
prompts.py (rank-classification prompts, T5 casting), scoring.py (batched model calls),
metrics.py, runner.py (outputs), cli.py, finetune_data.py (text-to-text fine-tuning tasks)."""
