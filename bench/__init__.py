"""Our engine against HF transformers + PEFT, on the same shapes, data, weights and seeds, in one process.

    python -m bench --cpu            # SmolLM2-135M shape on the CPU (every machine)
    python -m bench --gpu            # SmolLM2, Llama-3.2-1B and Llama-3.1-8B shapes (random weights, no download)
    python -m bench --quick          # tiny shapes: checks the script in seconds
    python -m bench --gpu --check    # the GPU plan cut to gpu_check.sh's time limits (the device check)
    python -m bench --cpu --only train,loss --json rows.jsonl
    python -m bench --cpu --threads 1    # on a machine shared with other work: steadier, timed in CPU time

Each row builds ours and HF's, measures, frees, and records an error instead of stopping (one OOM loses one cell).
Figures are ratios taken in the same run; the targets are in ../shared/PERFORMANCE.md; results in RESULTS.md.
Never a timed test (tests/bench checks the script on tiny shapes, never its speed).
"""
