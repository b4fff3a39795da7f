"""The stages of scripts/gpu_proof.py: one prepared command that proves mixbuild's CUDA paths on
a GPU in a few minutes (and runs the same code on the CPU, in Triton's interpreter, with
--dry-run). core: budgets, stage records, goals; environment, kernels, end_to_end, decode,
tuning: the stages; report: gpu_proof.json, gpu_proof.md and the plots."""
