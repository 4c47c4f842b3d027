# Run 27's experiment (docs/benchmarks.md): put this folder on PYTHONPATH and every Python process started with it
# runs with the cyclic garbage collector off, to see whether GC pauses leave the GPU idle in the trainer's step.
import gc

gc.disable()
