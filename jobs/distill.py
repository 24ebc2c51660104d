"""Ray job entrypoint: `python -m jobs.distill [flags of cast distill]` (joins the job's cluster)."""
from jobs.entrypoint import stage_main

if __name__ == "__main__":
    raise SystemExit(stage_main("distill"))
