"""Training stages a user runs on their own (`herd train`, `distill`, `upcycle`, `synth`; `torchrun -m herd.train`):
the loop (train.py), data, losses, optimizer, torch.distributed, distillation, upcycling and synthetic data. Nothing
on the inference path (herd run / serve) imports this package."""
