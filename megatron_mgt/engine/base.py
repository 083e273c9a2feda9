"""The interface the trainer sees. Every engine provides:

    model                     the (local part of the) model, for inspection only
    device                    this rank's device
    lr                        current learning rate
    train_step(micro_batches[, gate]) -> {'loss': global mean, 'grad_norm': over all ranks/stages,
                              'applied': whether the optimizer stepped, 'update_norm': |update| or None}
                              (gate(loss, grad_norm) -> bool may withhold the step: single, fsdp)
    eval_loss(inputs, targets) -> global loss of one batch (every rank passes the same batch)
    save(dir) / load(dir)     every rank writes/reads its own files in the same dir
    rank, world_size          global process rank and count
    dp_rank, dp_size          data-parallel coordinates: the loader's rank/world_size
    is_main                   global rank 0: logs, metrics, checkpoint rename + pointer
    geometry_snapshot(probe, center) -> evaluate.geometry_snapshot of the whole model on every
                              rank (the pipeline assembles it from what each stage measured)
    barrier(), any_rank(flag), close()

The defaults here are those of one process; distributed engines override them.
"""

from __future__ import annotations

import torch


class EngineBase:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def geometry_snapshot(self, probe: torch.Tensor, center: bool) -> dict:
        """One forward pass of `self.model` (the whole Transformer) in eval mode; under
        FSDP / ZeRO-3 every rank must call it (parameters are gathered collectively)."""
        from megatron_mgt.evaluate import geometry_snapshot  # evaluate imports the trainer, which imports engines

        was_training = self.model.training
        self.model.eval()
        try:
            return geometry_snapshot(self.model, probe, center)
        finally:
            self.model.train(was_training)

    def barrier(self) -> None:
        from megatron_mgt.engine.dist import barrier

        barrier()

    def any_rank(self, flag: bool) -> bool:
        from megatron_mgt.engine.dist import any_rank

        return any_rank(flag, self.device)

    def close(self) -> None:
        """Leave the process group (distributed engines); nothing for one process."""
