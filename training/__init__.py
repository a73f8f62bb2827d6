"""Training: data, one accelerate loop for full and LoRA fine-tuning, evaluation and verified exports.

Entry point: `python -m training train|export|eval` (see training/__main__.py).
"""
