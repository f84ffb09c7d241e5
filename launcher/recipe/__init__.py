"""The recipe's side: its contract (contract.py), its data cut into batches, its step made a loss, and the helpers
a recipe imports (optimizers, losses, progress bars)."""
