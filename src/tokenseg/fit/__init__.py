"""The one training loop (:func:`fit`), its checkpoint format (:mod:`.state`) and its schedules and
data-order rule (:mod:`.schedule`), shared by the classifier methods (``engine``), the segmentation
network (``segment.train``), AffinityNet and IRN (``refine``). Imports only ``core``."""
from .loop import LOG_EVERY, At, EpochEnd, Task, fit, start_log
from .schedule import apply_lr, epoch_generator, epoch_order, lr_at, lr_at_epoch, poly_lr
from .state import FORMATS, finished_step, kind_of, read_state, restore, restore_rng, save_state

__all__ = ["fit", "Task", "At", "EpochEnd", "start_log", "LOG_EVERY", "lr_at", "lr_at_epoch", "poly_lr",
           "apply_lr", "epoch_generator", "epoch_order", "save_state", "read_state", "restore", "restore_rng",
           "kind_of", "finished_step", "FORMATS"]
