"""The run state: everything the next training step depends on, in one dataclass.

Every stage of the loop in :mod:`scalesgd.run` takes a :class:`TrainState` and returns the next one; nothing
the next step needs lives anywhere else. :meth:`TrainState.to_checkpoint` writes it as tensors and plain
Python (loadable with ``torch.load(weights_only=True)``) and :meth:`TrainState.from_checkpoint` reads it back,
so a resume is that state read back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from scalesgd.batch_policy import BatchPolicyState
from scalesgd.data.sharding import Cursor
from scalesgd.diversity import EMAState
from scalesgd.transforms import state_from_tree, state_to_tree

if TYPE_CHECKING:
    from scalesgd.goodput import GoodputState


def policy_to_checkpoint(policy: Any) -> dict[str, Any]:
    """A batch policy's state as plain data: the goodput policy's tagged ``{"goodput": to_dict()}``."""
    if type(policy).__name__ == "GoodputState":
        return {"goodput": policy.to_dict()}
    return dataclasses.asdict(policy)


def policy_from_checkpoint(blob: dict[str, Any]) -> Any:
    """Inverse of :func:`policy_to_checkpoint`."""
    if "goodput" in blob:
        from scalesgd.goodput import GoodputState  # deferred: goodput imports batch_policy, as this module does

        return GoodputState.from_dict(blob["goodput"])
    return BatchPolicyState(**blob)


@dataclass(frozen=True)
class LossWatch:
    """What divergence detection carries between steps (:func:`scalesgd.run.watch_loss`).

    Attributes:
        first_loss: the first step's training loss (the reference; None before the first step).
        smoothed_loss: EMA of the training loss.
        steps_above: consecutive steps the smoothed loss has stayed above the explosion threshold.
    """

    first_loss: float | None = None
    smoothed_loss: float | None = None
    steps_above: int = 0


@dataclass(frozen=True)
class TrainState:
    """One rank's whole training state between two steps.

    Attributes:
        params: (N,) the flat parameter vector. The model's parameters are views into it, so a step updates
            it in place; the state returned after the step holds the same tensor.
        tx_state: the gradient transformation's state (momentum buffer, Langevin generator).
        noise_ema: the EMA of the per-step ‖G‖² (mean gradient) and tr Σ estimates; None without a tap.
        policy: the batch-size policy's state (:class:`GoodputState` for ``goodput``).
        global_batch_size: the global batch the policy last chose (examples, all ranks).
        cursor: where the data stream stands (epoch, offset into that epoch's permutation).
        torch_rng_state: torch's global CPU generator state (the trainer's dropout masks come from
            :func:`scalesgd.models.example_randomness` instead, a function of seed, step and example).
        comm_generator: this rank's generator for the communication strategy's randomness (QSGD's
            stochastic rounding); seeded from the run's seed and the rank.
        step: optimizer steps done.
        examples: training examples consumed (all ranks).
        train_time_s: wall time spent in training steps (evaluation excluded), seconds.
        time_to_target_s, train_time_to_target_s: wall and training time when the target was first met
            (None until then).
        loss_watch: the smoothed training loss that divergence detection compares with the first one.
        base_lr: the base learning rate ``--lr auto`` found (None: not searched yet, or ``--lr`` given).
    """

    params: torch.Tensor
    tx_state: Any
    noise_ema: EMAState | None
    policy: BatchPolicyState | GoodputState
    global_batch_size: int
    cursor: Cursor
    torch_rng_state: torch.Tensor
    comm_generator: torch.Generator
    step: int = 0
    examples: int = 0
    train_time_s: float = 0.0
    time_to_target_s: float | None = None
    train_time_to_target_s: float | None = None
    loss_watch: LossWatch = LossWatch()
    base_lr: float | None = None

    def replace(self, **changes: Any) -> TrainState:
        """A copy with ``changes`` applied (the state is frozen)."""
        return dataclasses.replace(self, **changes)

    def epoch(self, n_train: int) -> float:
        """Epochs of data consumed, fractional: cursor epoch + offset / n_train."""
        return self.cursor.epoch + self.cursor.offset / n_train

    def to_checkpoint(self) -> dict[str, Any]:
        """The state as tensors and plain Python (copied to the CPU), for ``torch.save``; read back by
        :meth:`from_checkpoint`, also under ``torch.load(weights_only=True)``."""
        return {
            "params": self.params.detach().cpu().clone(),
            "tx_state": state_to_tree(self.tx_state),
            "noise_ema": dataclasses.asdict(self.noise_ema) if self.noise_ema is not None else None,
            "policy": policy_to_checkpoint(self.policy),
            "global_batch_size": self.global_batch_size,
            "cursor": [self.cursor.epoch, self.cursor.offset],
            "torch_rng_state": self.torch_rng_state.clone(),
            "comm_generator": {"state": self.comm_generator.get_state(), "device": str(self.comm_generator.device)},
            "step": self.step,
            "examples": self.examples,
            "train_time_s": self.train_time_s,
            "time_to_target_s": self.time_to_target_s,
            "train_time_to_target_s": self.train_time_to_target_s,
            "loss_watch": dataclasses.asdict(self.loss_watch),
            "base_lr": self.base_lr,
        }

    @classmethod
    def from_checkpoint(cls, blob: dict[str, Any], device: torch.device | str = "cpu") -> TrainState:
        """The state :meth:`to_checkpoint` wrote; parameters and buffers go to ``device``."""
        gen = torch.Generator(device=blob["comm_generator"]["device"])
        gen.set_state(blob["comm_generator"]["state"])
        return cls(
            params=blob["params"].to(device),
            tx_state=state_from_tree(blob["tx_state"], device),
            noise_ema=EMAState(**blob["noise_ema"]) if blob["noise_ema"] is not None else None,
            policy=policy_from_checkpoint(blob["policy"]),
            global_batch_size=int(blob["global_batch_size"]),
            cursor=Cursor(*blob["cursor"]),
            torch_rng_state=blob["torch_rng_state"],
            comm_generator=gen,
            step=int(blob["step"]),
            examples=int(blob["examples"]),
            train_time_s=float(blob["train_time_s"]),
            time_to_target_s=blob["time_to_target_s"],
            train_time_to_target_s=blob["train_time_to_target_s"],
            loss_watch=LossWatch(**blob.get("loss_watch", {})),
            base_lr=blob.get("base_lr"),
        )
