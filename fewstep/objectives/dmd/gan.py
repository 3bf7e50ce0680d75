"""DMD2's diffusion-GAN head on the fake score's bottleneck features.

The fake network runs in "classify mode" on a noised sample; a forward hook on its bottleneck module (the UNet's
``mid_block``, a middle transformer block, or any named module) captures the features, and a small head turns
them into one logit per sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn


def default_feature_module(backbone: nn.Module) -> str:
    """``mid_block`` for UNets, the middle of ``transformer_blocks`` for DiTs (SD3, Flux)."""
    if getattr(backbone, "mid_block", None) is not None:
        return "mid_block"
    blocks = getattr(backbone, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return f"transformer_blocks.{len(blocks) // 2}"
    raise ValueError(
        f"{type(backbone).__name__} has no `mid_block` or `transformer_blocks`: set objective.gan_feature_module to "
        "the name of the module whose output the GAN head reads (e.g. one from `named_modules()`)."
    )


def feature_channels(module: nn.Module) -> int:
    """The channel (or hidden) width of ``module``'s output: the last Linear/Conv2d inside it."""
    width = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            width = m.out_features
        elif isinstance(m, nn.Conv2d):
            width = m.out_channels
    if width is None:
        raise ValueError(f"Cannot infer the feature width of {type(module).__name__}: it has no Linear/Conv2d.")
    return width


def _pick(output: object) -> Tensor:
    """The hidden-state tensor of a block's output (SD3/Flux blocks return ``(context, hidden)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, Tensor)][-1]
    sample = getattr(output, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise TypeError(f"The GAN feature module returned {type(output).__name__}; expected a tensor.")


@contextmanager
def tap(module: nn.Module, store: list[Tensor]) -> Iterator[None]:
    """Append ``module``'s output to ``store`` on every forward while the context is open."""
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(_pick(out)))
    try:
        yield
    finally:
        handle.remove()


class GANHead(nn.Module):
    """``[b, c, h, w]`` → ``[Conv4×4 s2 → GroupNorm → SiLU] → mean → Linear`` (DMD2's head, pooled instead of a
    stride-4 conv so any resolution works); ``[b, n, d]`` tokens → mean → MLP; ``[b, d]`` → MLP. Output ``[b]``.
    """

    def __init__(self, channels: int, width: int = 256) -> None:
        super().__init__()
        groups = 32 if width % 32 == 0 else 1
        self.conv = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.GroupNorm(groups, width), nn.SiLU()
        )
        self.mlp = nn.Sequential(nn.Linear(channels, width), nn.SiLU())
        self.out = nn.Linear(width, 1)

    def forward(self, features: Tensor) -> Tensor:
        f = features.float()
        if f.ndim == 4:  # [b, c, h, w]
            h = self.conv(f).mean((2, 3)) if min(f.shape[2:]) >= 2 else self.mlp(f.mean((2, 3)))
        else:
            h = self.mlp(f.mean(1) if f.ndim == 3 else f.flatten(1))
        h = h + 0 * sum(p.sum() for p in self.parameters())  # every parameter in the graph: DDP needs no unused ones
        return self.out(h).sum(-1)  # [b]; not a view of the output (FSDP hooks the backward on what a module returns)


def head_for(backbone: nn.Module, module_name: str | None, width: int = 256) -> tuple[str, GANHead]:
    """The feature module's name and a head sized for it."""
    name = module_name or default_feature_module(backbone)
    try:
        module = backbone.get_submodule(name)
    except AttributeError as err:
        raise ValueError(
            f"objective.gan_feature_module={name!r} is not a module of {type(backbone).__name__}."
        ) from err
    return name, GANHead(feature_channels(module), width)
