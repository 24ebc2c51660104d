"""`cast bench`: extraction against a bare forward pass and a naive dump, head training
from the store against recomputing the activations, peak memory and bytes per token.

Everything is measured side by side in one run on the same tokens: one plan (the same
units, the same length-sorted padded batches) feeds every method, the methods run
interleaved (A, B, C, A, B, C, ...) `--reps` times, and the table reports medians, so a
noisy shared CPU shifts all methods alike instead of whichever happened to run last.

    cast bench --model smollm2-135m --tokens 8192
    cast bench --model gemma3-270m --reps 5 --json runs/bench/gemma.json

(a) extract / bare forward    Extractor.run (hooks, stop after the deepest hooked layer,
                              bf16 encode, stats, zarr write, commit) vs the model's plain
                              forward over the same batches: with the LM head (`forward`,
                              what a user runs) and without it (`backbone`, the stricter one).
                              `hooks` and `extract_no_write` split the gap into its layers.
                              The same extract/forward/backbone for the pair's other model
                              (--partner; --no-both skips it), so one run covers both.
(b) extract / naive dump      full forward with output_hidden_states=True for resid and
                              plain pre-hooks for attn_in/mlp_in, np.save of every site's
                              real-token values per batch (float32 by default).
(c) head epoch, store / recompute   one training epoch of one head (the same steps) reading
                              the pairs from the two stores, vs forwarding both models over
                              the same tokens to make the pairs first.
(d) peak RSS at N and 4N      `cast extract --workers 0` in a fresh subprocess each.
(w) unit writer / plain write  storage.writer.write_unit alone over units captured from one
                              extraction, vs the same raw bytes written into one file with
                              no compression; both fsync'd, MB/s of raw bytes. How fast a
                              model (a GPU) may forward before the writer is the limit.
(e) bytes per token           the store's activation bytes on disk vs the raw size of the
                              stored values (and vs float32).
(s) distill step, packed / one row per sample   one `cast distill` training step of the target
                              with a prompt's samples in one row (the prompt once) vs one row each
                              (bench/student.py).
(h) LM head, W·xᵀ / F.linear  the target's head matmul at 1-64 rows (forward, and forward +
                              backward) and a greedy decode, with the float32 CPU head as
                              load_model gives it (columns first) vs torch's F.linear
                              (bench/head.py); the decode's tokens must match.
(f) integrity cost            crc32c over every byte of the store (a write computes it once,
                              a read again) vs extraction and vs a full checked read; the
                              presence check of every chunk file (bench/integrity.py).
"""
