"""``train --fsdp``: FSDP2 (``fully_shard``) per decoder layer, with checkpoints that hold the whole adapter.

``bora-tools train --fsdp`` under ``torchrun`` (or ``accelerate launch`` with an FSDP
config, which sets ``ACCELERATE_USE_FSDP``) shards every decoder layer of the base
(the classes of the model's ``_no_split_modules``, as accelerate's transformer
auto-wrap policy picks them), then the root, with ``torch.distributed.fsdp.fully_shard``.
BoRA factors are sharded with the layer that holds them; gradients are
reduce-scattered and averaged like DDP's, so the run trains the adapter one
process trains on the same global batch.

``FsdpTrainer`` is a plain ``transformers.Trainer`` but for what sharding changes
(the failures PEFT #1702, transformers #30491 and accelerate #4206 came from):

- it shards the model itself before the optimizer is made, and hands it to
  accelerate without a DDP wrap (``_Sharded``);
- a checkpoint's adapter is gathered from every shard (``full_adapter_state``,
  every rank takes part) and written once, by rank 0, file by file atomically;
- the optimizer state is gathered the same way (``get_optimizer_state_dict`` with
  ``full_state_dict``) into ``optimizer.pt``, and loaded back into the shards on
  resume, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from bora_tools.errors import UnsupportedError
from bora_tools.training.checkpoints import write_adapter_files
from bora_tools.training.layers import adapter_keys

#: the variable ``accelerate launch`` sets from a config with ``distributed_type: FSDP``
ACCELERATE_FSDP_VARIABLE = "ACCELERATE_USE_FSDP"


def check(options):
    """``options`` with ``fsdp`` on when asked for (the flag, or ``accelerate launch`` with an FSDP config),
    checked to be possible here.

    Raises:
        UnsupportedError: one process, or a quantized base.
    """
    if not requested(options.fsdp):
        return options
    check_launch(quantized=options.load_in_4bit or options.load_in_8bit)
    return dataclasses.replace(options, fsdp=True)


def requested(fsdp: bool) -> bool:
    """True for ``fsdp`` or under ``accelerate launch`` with an FSDP config.

    accelerate's own FSDP plugin is switched off for the process (the variable is
    removed): the sharding is done here, and the Trainer must not wrap the model again.
    """
    from_accelerate = os.environ.get(ACCELERATE_FSDP_VARIABLE, "").lower() in ("1", "true", "yes")
    if from_accelerate:
        os.environ.pop(ACCELERATE_FSDP_VARIABLE)
    return fsdp or from_accelerate


def check_launch(*, quantized: bool) -> None:
    """Refuse ``fsdp`` where it cannot run: one process, or a quantized base."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UnsupportedError("`fsdp` shards the model over several processes; this is one",
                               hint="launch with torchrun --nproc_per_node N (or accelerate launch), or leave out "
                                    "`fsdp`")
    if quantized:
        raise UnsupportedError("`fsdp` with a 4-bit/8-bit base (`load_in_4bit`, `load_in_8bit`) is not supported",
                               hint="train a quantized base in one process, or shard the full-precision base")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the instances of the model's ``_no_split_modules`` classes."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UnsupportedError(f"`fsdp`: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    return layers


def shard(model: nn.Module, device_type: str) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, head), over all processes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor at full shape (CPU), gathered from the shards: a collective, every rank calls it."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name in adapter_keys(model):
        p = model.get_parameter(name)
        state[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
    return state


class _Sharded(nn.Module):
    """The sharded model as the Trainer's ``model_wrapped``: it calls the model, and keeps accelerate from
    wrapping it in DistributedDataParallel (FSDP already averages the gradients)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def trainer_class():
    """``FsdpTrainer`` (defined here: transformers is imported only when training)."""
    from transformers import Trainer
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    class FsdpTrainer(Trainer):
        """``transformers.Trainer`` over a model sharded with FSDP2 here (see the module's docstring)."""

        _sharded = False

        def _move_model_to_device(self, model, device):
            """Nothing: ``fully_shard`` moves each layer's shard to the mesh's device as it shards it, so the whole
            model never sits on one GPU (on the CPU the model is where it was loaded)."""

        def create_optimizer(self, model=None):
            if not self._sharded:  # the optimizer must hold the sharded parameters
                shard(self.model, self.args.device.type)
                self._sharded = True
            return super().create_optimizer(model)

        def _wrap_model(self, model, training=True, dataloader=None):
            if isinstance(model, _Sharded) or not training:
                return model
            prepared = self.accelerator.prepare_model(self.model, device_placement=False, evaluation_mode=True)
            return _Sharded(prepared)

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            state = full_adapter_state(self.model)  # every rank: the gather is collective
            if self.args.should_save:
                write_adapter_files(self.model, output_dir or self.args.output_dir, state_dict=state)

        def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = get_optimizer_state_dict(self.model, _inner(self.optimizer),
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.args.should_save:
                _save_atomic(full, Path(output_dir) / OPTIMIZER_NAME)
                with warnings.catch_warnings(record=True):
                    _save_atomic(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

        def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            if checkpoint is None:
                return
            full = torch.load(Path(checkpoint) / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            set_optimizer_state_dict(self.model, _inner(self.optimizer), optim_state_dict=full,
                                     options=StateDictOptions(full_state_dict=True))
            with warnings.catch_warnings(record=True):
                self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER_NAME, weights_only=True))

    return FsdpTrainer


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def _save_atomic(obj, path: Path) -> None:
    from bora_tools.io.atomic import atomic_output

    with atomic_output(path, overwrite=True) as tmp:
        torch.save(obj, tmp)
