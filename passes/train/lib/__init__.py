"""The shared training loop: checked batches, losses, optimizers, schedules, masks."""
