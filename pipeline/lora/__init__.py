"""LoRA tooling: built-in and JSONL tasks, standard PEFT LoRA training, evaluation."""
