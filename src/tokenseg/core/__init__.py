"""The leaf of tokenseg: what every layer needs and that knows nothing of WSSS configs or methods.

errors (the one user-facing error), files (atomic writes, confined output paths), locks (one writer per
folder), weights (the one tensors-only reader and state-dict unwrapper), masks and seeds (the file formats),
scores (seeds to per-pixel scores), crf, registry (methods by name), and small tools (progress, device,
resume, hub, optim, losses, metrics, ot, viz, plot). Nothing here imports another tokenseg package.
"""
