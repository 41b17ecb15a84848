"""`python -m herd.train ...` / `torchrun -m herd.train ...`: the training loop as a script (train.main)."""
from .train import main

main()
