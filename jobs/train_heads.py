"""Ray job entrypoint: `python -m jobs.train_heads [flags of cast train-heads]` (joins the job's cluster)."""
from jobs.entrypoint import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("train-heads"))
