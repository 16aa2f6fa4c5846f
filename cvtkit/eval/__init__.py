"""Evaluating and exporting checkpoints (the library half of finetune/evaluate.py and export.py);
fine-tuning itself is the training engine with `init.pretrained` (cvtkit.train.pretrained)."""
