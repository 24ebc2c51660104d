"""The pipeline's stages, one sub-package each, in the order they run:

    cache/     corpus, models, hooks, extraction into activation stores
    align/     token pairs across tokenizers, and the layer map
    lora/      tasks, standard LoRA training, exact-match evaluation
    assemble/  the bridge, the bridged artifact, the weight-space baseline, validation
    run.py     `cast run`: every stage on the embedded defaults

Head training sits between align and assemble in its own top-level package, heads/.
See docs/architecture.md.
"""
