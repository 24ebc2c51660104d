"""Ray job entrypoint: `python -m jobs.lora train [flags of cast lora train]`."""
from jobs.entrypoint import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("lora"))
