"""Full-precision master weights for a model held in bf16, and the AdamW every trainer builds on them.

Where bf16 is native (a GPU, or a CPU with AVX-512 BF16 or AMX) the device model is loaded in bf16
(`collab_env.models.resolve_dtype`), which halves decode and update time. Its weights keep 8
significant bits, so an optimizer step smaller than about 2^-9 of a weight rounds back to the same
weight: AdamW at the presets' learning rates (1e-5 for SmolLM2, 2e-6 to 5e-6 in the paper's runs)
would leave most weights where they were (one step at lr 1e-5 moved 2% of SmolLM2-135M's weights).
`MasterWeights` keeps an fp32 copy of every low-precision trainable parameter: the model computes
forward and backward in bf16, each gradient is accumulated in fp32 on its copy (so micro-batches
add up at full precision), AdamW steps the copies, and after every step the copies are rounded into
the model. This is the scheme of mixed-precision training with master weights (Micikevicius et al.
2018; DeepSpeed's and Megatron's bf16 optimizers). Parameters already in fp32 (the value head, LoRA
adapters, any fp32 model) are stepped as they are. The cost is memory: 4 bytes a trainable
parameter for its copy, and AdamW's two moments in fp32 (8 bytes) where they were in bf16 (4), so
8 bytes a parameter more (24 GB for the 3B model of `countdown_paper`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def trainable_parameters(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters by name, each once (a tied weight under its first name)."""
    seen: set[int] = set()
    for name, param in module.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            yield name, param


class MasterWeights:
    """fp32 copies of a model's low-precision trainable parameters, stepped in their place."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.model_params = dict(trainable_parameters(module))
        self.masters: dict[str, torch.Tensor] = {}
        self.hooks = []
        for name, param in self.model_params.items():
            if param.dtype == torch.float32:
                self.masters[name] = param
                continue
            master = param.detach().float().clone().requires_grad_(True)
            self.masters[name] = master
            self.hooks.append(param.register_post_accumulate_grad_hook(self._accumulate_into(master)))

    @staticmethod
    def _accumulate_into(master: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None

        return hook

    @staticmethod
    def needed(module: torch.nn.Module) -> bool:
        """Whether any trainable parameter of `module` is held below fp32."""
        return any(param.dtype != torch.float32 for _, param in trainable_parameters(module))

    def parameters(self) -> list[torch.Tensor]:
        """What the optimizer steps: the fp32 copies, and the fp32 parameters themselves."""
        return list(self.masters.values())

    def release(self) -> None:
        """Stop moving the model's gradients to the copies (when their training ends and another
        optimizer takes over the model, as after the format warm-up)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def round_into_model(self) -> None:
        with torch.no_grad():
            for name, master in self.masters.items():
                param = self.model_params[name]
                if param is not master:
                    param.copy_(master)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The full-precision trainable state by parameter name, as a checkpoint stores it."""
        return {name: master.detach().cpu().contiguous() for name, master in self.masters.items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Restore the copies from a checkpoint's tensors (as `tensors` wrote them) and round them into the model."""
        with torch.no_grad():
            for name, value in weights.items():
                if name in self.masters:
                    self.masters[name].copy_(value.to(self.masters[name].device, torch.float32))
        self.round_into_model()


def stepped_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors `optimizer` steps, which hold the gradients to clip and sum: a bf16 model's fp32
    copies where `adamw` made them, else the model's own parameters."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def adamw(
    module: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, master_weights: bool
) -> tuple[torch.optim.AdamW, MasterWeights | None]:
    """AdamW over `module`'s trainable parameters, on fp32 master weights where the module is in bf16
    and `master_weights` is set (else over the parameters themselves, whatever their precision)."""
    if not (master_weights and MasterWeights.needed(module)):
        params = [param for _, param in trainable_parameters(module)]
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay), None
    master = MasterWeights(module)
    optimizer = torch.optim.AdamW(master.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    optimizer.register_step_post_hook(lambda *_: master.round_into_model())
    return optimizer, master
