"""``--lr auto``: the trainer finds its own base learning rate with a short range test before training.

The search itself is the pure state machine :class:`scalesgd.goodput.LrRangeTest`; this module runs its trials
on the real model inside the run's clock: a trial that lowered the probe loss is kept (training continues from
it), one that raised it is undone (the state saved before it restored).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable

import torch

from scalesgd import distributed
from scalesgd.comm import CommStrategy, scalar_sum
from scalesgd.config import RunConfig
from scalesgd.data.sharding import BatchStream, Cursor, shard
from scalesgd.distributed import World
from scalesgd.goodput import LrRangeTest
from scalesgd.lr_rules import LrConfig, lr_terms
from scalesgd.step import FlatModel, evaluate, train_step
from scalesgd.train_state import TrainState
from scalesgd.transforms import GradientTransformation, Hyper, state_from_tree, state_to_tree
from scalesgd.writer import RunWriter


# --lr auto: the range test's ramp (from the trainer's default --lr, x3 per trial, one refinement between the
# last stable and the first unstable rate: a factor sqrt(3) of precision, where a second would mostly cost one
# more undone trial) and its pick: the largest stable rate / 4. The trials continue the training (each from
# where the last stable one left off, as Smith's range test is one run with a rising rate, arXiv 1506.01186
# §3.3), so the edge it finds is the edge of the model being trained, not of its initialisation; a constant
# rate a quarter of that edge is Smith's "base_lr = 1/3 to 1/4 of max_lr" (ibid.),
# below the quadratic's optimum of half the edge (LrRangeTest's docstring) because a whole run's gradient noise
# and growing curvature tolerate less than five steps do. LR_PROBE_MARGIN divides the pick further (1: none).
# Then the trial length, the probe batch (the same examples before and after a trial: a paired comparison) and
# the share of the run's estimated wall time the probe may cost (the time of trials that were not kept and of
# the probe-loss evaluations; the kept trials' steps are training).
LR_PROBE = dict(start_lr=0.05, factor=3.0, max_trials=10, refine_trials=1, pick="stable", safety_factor=4.0)
LR_PROBE_MARGIN = 1.0
# When the start itself was unstable, the search backs off from it, and the edge it finds is that of the barely
# trained model (one kept trial at most), which is higher than a trained model's (curvature grows early in
# training: Cohen et al., arXiv 2103.00065): the pick is divided by this as well, so by 10 in all, the "loss
# minimum / 10" convention of range tests that start from initialisation.
LR_PROBE_COLD_MARGIN = 2.5
LR_PROBE_STEPS = 5
LR_PROBE_LOSS_EXAMPLES = 512
LR_PROBE_BUDGET = 0.05


def _local_probe_loss(flat: FlatModel, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, *, world: World,
                      classification: bool) -> tuple[float, float]:
    """This rank's (loss sum, example count) on its part of the fixed probe batch; sum over ranks outside."""
    loss_sum, _, count = evaluate(flat.model, loss_fn, x, y, rank=world.rank, world_size=world.size,
                                  device=world.device, classification=classification)
    return loss_sum, count


def find_base_lr(state: TrainState, *, cfg: RunConfig, lr_config: LrConfig, flat: FlatModel, loss_fn: Callable,
                 read: Callable[[torch.Tensor], tuple[Any, torch.Tensor]], n_train: int, world: World,
                 comm: CommStrategy,
                 tx: GradientTransformation, classification: bool, total_steps: int, start_s: float,
                 writer: RunWriter) -> tuple[TrainState, LrConfig]:
    """``--lr auto``: find the base learning rate with :class:`scalesgd.goodput.LrRangeTest` before training.

    A trial: ``LR_PROBE_STEPS`` training steps at the proposed rate on fresh batches of the starting global batch
    (from a stream of its own, apart from the run's data order), then the mean loss on a fixed probe batch
    (``LR_PROBE_LOSS_EXAMPLES`` training examples, eval mode), compared with the loss on the same batch before
    the trial. A trial the range test calls stable or flat is kept: the next trial continues from it (the
    parameters, optimizer state and RNGs it left), so the probe trains the model while it searches, as Smith's
    range test is one run with a rising rate. A trial that rose or diverged is undone: the state saved before it
    is restored, so a divergence leaves nothing behind and the search backs off or refines from there. Training
    then starts from the last kept state at the chosen rate. The trials run at the starting global batch, so the
    chosen rate is the lr rule's rate there: the base lr (at ``--base-batch-size``) is it divided by the rule's
    factor at the starting batch, and the run's first step trains at the chosen rate whatever B₀ is.

    Budget: the probe's cost is its wall time minus the kept trials' training steps (so: the evaluations of
    the probe loss, saving and restoring, and every undone trial). The first trial's median step time × the
    run's steps (``total_steps``, at the starting batch) estimates the run's wall time; no trial starts that
    would take the cost past ``LR_PROBE_BUDGET`` of it if that trial were undone (the choice is then made from
    the trials so far). The whole probe, kept steps included, counts in ``train_time_s`` and, as it runs after
    ``start_s``, in every wall-clock time of the run. The kept trials' examples are extra: they are not counted
    in the run's epochs (its own data order starts after the probe), and ``lr_auto`` logs how many there were.

    Every decision is a function of all-reduced numbers (losses, the rank-mean of times), so all ranks agree.
    Logs one ``lr_probe`` record per trial and one ``lr_auto`` record with the choice and its reason.

    Returns:
        The state (``base_lr`` set, ``tx_state`` the kept trials', ``train_time_s`` including the probe) and
        ``lr_config`` with that base lr. The parameters in ``flat`` are the kept trials'.
    """
    if state.base_lr is not None:  # found before a resume: keep it
        return state, dataclasses.replace(lr_config, base_lr=state.base_lr)
    distributed.barrier(world)  # ranks start apart: that skew is start-up, not the probe's time
    t_start = time.perf_counter()
    test = LrRangeTest(**LR_PROBE)
    search = test.init_state()
    seed = cfg.seed + 104_729  # the probe's data: fixed, and apart from the run's own order
    probe_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:LR_PROBE_LOSS_EXAMPLES]
    x_probe, y_probe = read(probe_idx)
    stream, cursor = BatchStream(n_train, seed), Cursor()

    def next_batches():
        nonlocal cursor
        out = []
        for _ in range(LR_PROBE_STEPS):
            batch, cursor = stream.next(cursor, state.global_batch_size)
            out.append(batch)
        return out

    batches = next_batches()
    saved_params = flat.params.detach().clone()
    saved_tx = state_to_tree(state.tx_state)
    saved_rng, saved_comm_rng = torch.get_rng_state(), state.comm_generator.get_state()
    total = scalar_sum(comm, world)  # one reduction a trial, through the run's own ring when it is one
    loss_sum, count = total(list(_local_probe_loss(flat, loss_fn, x_probe, y_probe, world=world,
                                                   classification=classification)))
    loss_before = start_loss = loss_sum / max(count, 1.0)
    budget_s, run_est_s, trial_s, stop = None, None, [], "the range test finished"
    kept_s, kept_examples = 0.0, 0
    while (lr := test.propose(search)) is not None:
        spent = sum(trial_s) - kept_s  # rank means of all-reduced times: every rank takes the same decision
        if budget_s is not None and spent + max(trial_s) > budget_s:
            stop = (f"the probe's cost budget {budget_s:.3g} s ({LR_PROBE_BUDGET:.0%} of the run's estimated "
                    f"{run_est_s:.3g} s) would be passed if the next trial were not kept")
            break
        t0 = time.perf_counter()
        # a copy: the momentum update writes into its buffer, and an undone trial must leave the saved one intact
        tx_state, step_times = state_from_tree(copy.deepcopy(saved_tx), world.device), []
        for i, batch in enumerate(batches):
            sizes = [int(t.numel()) for t in torch.tensor_split(batch.indices, world.size)]
            x, y = read(shard(batch.indices, world.rank, world.size))
            result, tx_state = train_step(
                flat=flat, loss_fn=loss_fn, x=x, y=y, global_batch_size=int(batch.indices.numel()),
                shard_sizes=sizes, rank=world.rank, comm=comm, tx=tx, tx_state=tx_state,
                hyper=Hyper(lr=lr, step=i), tap=None, classification=classification)
            step_times.append(result.compute_s + result.comm_s + result.update_s)
            # the all-reduced batch loss (the same on every rank): past the range test's divergence threshold the
            # trial is called diverged at once, its remaining steps and the probe-loss evaluation not spent
            if not math.isfinite(result.loss) or result.loss > test.diverge_factor * abs(start_loss):
                aborted = result.loss
                break
        else:
            aborted = None
        # one reduction a trial: the probe loss (none after an aborted trial) with the trial's times
        local_loss = ((0.0, 0.0) if aborted is not None else
                      _local_probe_loss(flat, loss_fn, x_probe, y_probe, world=world, classification=classification))
        loss_sum, count, elapsed, median_step, steps_s = total(
            [*local_loss, time.perf_counter() - t0, sorted(step_times)[len(step_times) // 2], sum(step_times)])
        loss_after = loss_sum / max(count, 1.0) if aborted is None else aborted
        verdict = test.verdict(search, loss_before, loss_after)
        keep = verdict in ("stable", "flat")
        if keep:
            saved_params.copy_(flat.params.detach())
            saved_tx = state_to_tree(tx_state)
            saved_rng, saved_comm_rng = torch.get_rng_state(), state.comm_generator.get_state()
        else:
            with torch.no_grad():
                flat.params.copy_(saved_params)
            torch.set_rng_state(saved_rng)
            state.comm_generator.set_state(saved_comm_rng)
        trial_s.append(elapsed / world.size)
        if keep:
            kept_s += steps_s / world.size
            kept_examples += sum(int(batch.indices.numel()) for batch in batches)
        if budget_s is None:
            run_est_s = median_step / world.size * total_steps
            budget_s = LR_PROBE_BUDGET * run_est_s
        search = test.observe(search, lr, loss_before, loss_after)
        trial = search.trials[-1]
        writer.log({"kind": "lr_probe", "trial": len(search.trials), "lr": lr, "loss_before": loss_before,
                    "loss_after": loss_after if math.isfinite(loss_after) else None, "verdict": trial.verdict,
                    "steps": LR_PROBE_STEPS, "global_batch_size": state.global_batch_size, "kept": keep,
                    "trial_s": trial_s[-1], "time_s": time.perf_counter() - start_s})
        if keep:
            loss_before, batches = loss_after, next_batches()
    lr_at_start, reason = _choose_probe_lr(test, search, stop)
    # The trials ran at the starting batch, so their rate is the rule's rate there; the base lr is that at B₀
    # (--base-batch-size): divided by the rule's factor at the starting batch (linear B/B₀, sqrt √(B/B₀); 1 for
    # constant and for AdaScale, whose gain is 1 before any noise estimate).
    rule_factor = lr_terms(dataclasses.replace(lr_config, base_lr=1.0), step=0, epoch=0.0,
                           global_batch_size=state.global_batch_size).rule_factor
    lr = lr_at_start / rule_factor
    if rule_factor != 1.0:
        reason += (f"; at the starting batch {state.global_batch_size}: the base lr at --base-batch-size "
                   f"{lr_config.base_batch_size} is {lr_at_start:.4g} / the {lr_config.rule} rule's factor "
                   f"{rule_factor:.4g} = {lr:.4g}")
    probe_s = total([time.perf_counter() - t_start])[0] / world.size
    writer.log({"kind": "lr_auto", "lr": lr, "lr_at_start_batch": lr_at_start, "reason": reason,
                "trials": len(search.trials),
                "probe_s": probe_s, "kept_s": kept_s, "cost_s": probe_s - kept_s, "kept_examples": kept_examples,
                "budget_s": budget_s, "estimated_run_s": run_est_s,
                "time_s": time.perf_counter() - start_s})
    state = state.replace(tx_state=state_from_tree(saved_tx, world.device), base_lr=lr,
                          train_time_s=state.train_time_s + probe_s)
    return state, dataclasses.replace(lr_config, base_lr=lr)


def _choose_probe_lr(test: LrRangeTest, search, stop: str = "the range test finished") -> tuple[float, str]:
    """The base rate from the range test, and a reason that says what happened: its pick
    (:meth:`LrRangeTest.result`: with ``LR_PROBE``, the largest stable rate / its safety factor) divided by
    ``LR_PROBE_MARGIN``, and by ``LR_PROBE_COLD_MARGIN`` too when the first trial (the start) was unstable.

    When the ramp stopped (``stop``: why, e.g. the time budget) before any rate was unstable, the data bound the
    rate only from below, so the rate is never below the ramp's start (the trainer's default ``--lr``): the
    divided pick when it is above the start, else the start, and the reason then says so instead of quoting the
    divided pick it did not use. Before any stable rate: the largest rate that did not rise (too small to show
    in a few steps, but safe), divided by the safety factor and margin(s) when an unstable rate lies above it
    (the edge is then within a ramp factor of it), else the next rate below the smallest unstable one, divided
    by the margin(s).
    """
    trials = search.trials
    stable = [t for t in trials if t.verdict == "stable"]
    cold = bool(trials) and trials[0].verdict in ("rose", "diverged")  # the start was unstable: backed off
    margin = LR_PROBE_MARGIN * (LR_PROBE_COLD_MARGIN if cold else 1.0)
    why = " (the start was unstable: the edge is the barely trained model's)" if cold else ""
    if stable:
        result = test.result(search)
        lr = result.lr / margin
        if any(t.verdict in ("rose", "diverged") for t in trials) or lr >= test.start_lr:
            return lr, f"{result.reason}; / margin {margin:g}{why} -> {lr:.4g}; stopped: {stop}"
        # no unstable rate reached: the data do not bound the rate from above, so keep the ramp's start
        if len(trials) == 1:
            ran = f"one trial ran ({trials[0].describe()}) before the search stopped ({stop})"
        else:
            ran = (f"{len(trials)} trials up to lr {max(t.lr for t in trials):.4g} ran before the search stopped "
                   f"({stop}); the pick was {result.lr:.4g}")
        return test.start_lr, (f"{ran}; no rate was unstable and the pick / margin {LR_PROBE_MARGIN:g} is below "
                               f"the ramp's start, so the base lr is the start {test.start_lr:g} (the trainer's "
                               f"default --lr)")
    flat_trials = [t for t in trials if t.verdict == "flat"]
    if flat_trials:
        best = max(flat_trials, key=lambda t: t.lr)
        above = [t for t in trials if t.verdict in ("rose", "diverged") and t.lr > best.lr]
        if above:
            # an unstable rate a ramp factor above bounds the edge: the flat rate is near it, not merely too small
            # to show (a small batch's few examples barely move the probe loss), so it is divided as a stable pick
            lr = best.lr / test.safety_factor / margin
            return lr, (f"no trial lowered the loss by {test.min_rel_decrease:.0%}; the largest flat one "
                        f"({best.describe()}) / safety factor {test.safety_factor:g} / margin {margin:g}{why}, as "
                        f"the first unstable {min(above, key=lambda t: t.lr).describe()} bounds it -> {lr:.4g}; "
                        f"stopped: {stop}")
        return best.lr, (f"no trial lowered the loss by {test.min_rel_decrease:.0%}; the largest flat one "
                         f"({best.describe()}), with no unstable rate above it; stopped: {stop}")
    smallest = min(trials, key=lambda t: t.lr)
    lr = smallest.lr / test.factor / margin
    return lr, (f"every trial was unstable; the next rate down ({smallest.lr / test.factor:.4g}, untried) / margin "
                f"{margin:g}{why} -> {lr:.4g}; lowest: {smallest.describe()}; stopped: {stop}")
